"""Ready-encoded decisions: the JSON body and ETag of ``GET /batch-size``, encoded once per change.

Services poll far more often than their decision changes (the memory figures move once a sample,
the batch size more rarely), so serialising the decision and hashing its ETag on every poll is
wasted work. Here each (service, GPU) keeps the bytes of its last decision.

An entry is reused only for a decision *equal* to the one it was encoded from. The body is a pure
function of the :class:`~optimizer.engine.Decision` (a frozen value), so a reused body is the body
that would have been encoded, whatever changed the engine's state in between: a sample, a report,
an override, a settings change, a restore at start-up. The price is one comparison of two small
values per poll.

The answers' headers are built with the bytes (per ``Cache-Control`` max-age, which follows the
monitoring interval): a poll copies them, it does not format them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from optimizer.api.decisions import decision_dict, decision_etag
from optimizer.engine import Decision

DEFAULT_ENTRIES = 4096  # (GPU, service) pairs kept at most; about 1 KiB each
SLACK = 64  # pairs kept beyond twice the live ones before those no longer live are dropped

Key = tuple[int | None, str]  # (GPU index, service), as the engine keys its services


def _opaque(tag: str) -> str:
    """An entity tag without its weakness prefix: If-None-Match compares weakly (RFC 9110, 13.1.2)."""
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


@dataclass(frozen=True, slots=True)
class Encoded:
    """One decision, encoded: ``body`` is its compact JSON (UTF-8), ``etag`` its weak validator."""

    decision: Decision
    body: bytes
    etag: str
    opaque_etag: str
    # by max-age: the 200 answer's headers and the 304's, built at the first poll that needs them
    _headers: dict[int, tuple[CIMultiDictProxy[str], CIMultiDictProxy[str]]] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, d: Decision) -> Encoded:
        etag = decision_etag(d)
        return cls(d, json.dumps(decision_dict(d), separators=(",", ":")).encode("utf-8"), etag, _opaque(etag))

    def headers(self, max_age: int) -> tuple[CIMultiDictProxy[str], CIMultiDictProxy[str]]:
        """The headers of the 200 answer (``ETag``, ``Cache-Control``, ``Content-Type``, ``Content-Length``,
        in the order aiohttp writes them for a JSON body) and of the 304 (``ETag``, ``Cache-Control``)."""
        kept = self._headers.get(max_age)
        if kept is None:
            not_modified = CIMultiDict([("ETag", self.etag), ("Cache-Control", f"max-age={max_age}")])
            ok = not_modified.copy()
            ok.extend([("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(self.body)))])
            kept = self._headers[max_age] = (CIMultiDictProxy(ok), CIMultiDictProxy(not_modified))
        return kept

    def matches(self, if_none_match: str) -> bool:
        """Whether an ``If-None-Match`` header value names this entity (weak comparison, ``*``, lists)."""
        if if_none_match == self.etag:  # what a following client sends: the tag it was given
            return True
        if if_none_match.strip() == "*":
            return True
        return self.opaque_etag in [_opaque(t) for t in if_none_match.split(",")]


Peer = str | None  # the client's address (``request.remote``)


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    """A registered service's answer to one poll, valid while the engine's ``changes`` count is ``changes``.

    ``key`` is the service's (GPU index, service), whose liveness a poll answered from here notes; ``ok``
    and ``not_modified`` the headers of the ``200`` and the ``304`` (the monitoring interval's max-age).
    """

    changes: int
    key: tuple[int, str]
    encoded: Encoded
    ok: CIMultiDictProxy[str]
    not_modified: CIMultiDictProxy[str]


class EncodedDecisions:
    """The last encoded decision per (GPU index, service), at most ``entries`` of them.

    ``live`` returns the pairs the engine still knows (``engine.state.services``). When the store
    holds more than twice as many pairs as are live (plus a little slack), the pairs no longer live
    are dropped: services that expired take their bytes with them. Past ``entries`` (more live
    pairs than that), the pair encoded longest ago goes first.

    Beside them, the last answer to each (raw query string, peer) of ``GET /batch-size`` that a
    registered service got (:meth:`kept`, :meth:`keep`). A poll is a function of its query string, its
    peer (whose address decides whether its ``pod`` is taken) and the engine's inputs, which
    :attr:`Engine.changes <optimizer.engine.Engine.changes>` counts. So while the count is the one an
    answer was kept at, a poll with the same query string from the same peer gets the same answer and
    changes nothing but its service's liveness: the read API answers it from here (docs/architecture.md,
    "The hot paths"). Anything else (a first poll, a changed decision, an unknown name, a bad query, no
    GPU) takes the whole path. At most ``entries`` answers are kept; then the table starts over (made-up
    query strings cannot grow it). ``hits`` counts the polls answered from a kept encoding (either
    table), ``misses`` the decisions encoded afresh.
    """

    def __init__(self, live: Callable[[], Collection[Key]], entries: int = DEFAULT_ENTRIES) -> None:
        if entries < 1:
            raise ValueError(f"entries must be at least 1, got {entries}")
        self.live = live
        self.entries = entries
        self._by_key: dict[Key, Encoded] = {}
        self._answers: dict[tuple[str, Peer], KeptAnswer] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, d: Decision) -> Encoded:
        """``d`` encoded: the kept bytes when ``d`` equals the decision they came from, else fresh ones."""
        key = (d.gpu_index, d.service)
        kept = self._by_key.get(key)
        if kept is not None and (kept.decision is d or kept.decision == d):  # the engine reuses its decisions
            self.hits += 1
            return kept
        self.misses += 1
        fresh = Encoded.of(d)
        if kept is not None:
            del self._by_key[key]  # re-inserted last: the order is the order of encoding
        else:
            self._make_room()
        self._by_key[key] = fresh
        return fresh

    def _make_room(self) -> None:
        live = self.live()
        if len(self._by_key) >= 2 * len(live) + SLACK:
            self._by_key = {k: v for k, v in self._by_key.items() if k in live}
        if len(self._by_key) >= self.entries:
            del self._by_key[next(iter(self._by_key))]

    def kept(self, query: str, peer: Peer, changes: int) -> KeptAnswer | None:
        """The answer kept for ``query`` from ``peer``, if it was kept at ``changes`` (a hit), else ``None``."""
        kept = self._answers.get((query, peer))
        if kept is None or kept.changes != changes:
            return None
        self.hits += 1
        return kept

    def keep(self, query: str, peer: Peer, answer: KeptAnswer) -> None:
        """Keep ``answer`` for ``query`` from ``peer`` (a registered service's, made at ``answer.changes``)."""
        answers = self._answers
        if len(answers) >= self.entries and (query, peer) not in answers:
            answers.clear()
        answers[(query, peer)] = answer
