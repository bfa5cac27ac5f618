"""Ready-encoded decisions: the JSON body and ETag of ``GET /batch-size``, encoded once per change.

Services poll far more often than their decision changes (the memory figures move once a sample,
the batch size more rarely), so serialising the decision and hashing its ETag on every poll is
wasted work. Here each (service, GPU) keeps the bytes of its last decision.

An entry is reused only for a decision *equal* to the one it was encoded from. The body is a pure
function of the :class:`~optimizer.engine.Decision` (a frozen value), so a reused body is the body
that would have been encoded, whatever changed the engine's state in between: a sample, a report,
an override, a settings change, a restore at start-up. The price is one comparison of two small
values per poll.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from optimizer.engine import Decision

DEFAULT_ENTRIES = 4096  # (service, GPU) pairs kept; about 1 KiB each


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

    @classmethod
    def of(cls, d: Decision) -> Encoded:
        etag = d.etag
        return cls(d, json.dumps(d.to_dict(), separators=(",", ":")).encode("utf-8"), etag, _opaque(etag))

    def matches(self, if_none_match: str) -> bool:
        """Whether an ``If-None-Match`` header value names this entity (weak comparison, ``*``, lists)."""
        if if_none_match == self.etag:  # what a following client sends: the tag it was given
            return True
        if if_none_match.strip() == "*":
            return True
        return self.opaque_etag in [_opaque(t) for t in if_none_match.split(",")]


class EncodedDecisions:
    """The last encoded decision per (service, GPU index), at most ``entries`` of them.

    When full, the pair encoded longest ago is dropped first, so services that went away (and
    names polled once) cannot grow it without bound.
    """

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        if entries < 1:
            raise ValueError(f"entries must be at least 1, got {entries}")
        self.entries = entries
        self._by_key: dict[tuple[str, int | None], Encoded] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, d: Decision) -> Encoded:
        """``d`` encoded: the kept bytes when ``d`` equals the decision they came from, else fresh ones."""
        key = (d.service, d.gpu_index)
        kept = self._by_key.get(key)
        if kept is not None and kept.decision == d:
            self.hits += 1
            return kept
        self.misses += 1
        fresh = Encoded.of(d)
        if kept is not None:
            del self._by_key[key]  # re-inserted last: the order is the order of encoding
        elif len(self._by_key) >= self.entries:
            del self._by_key[next(iter(self._by_key))]
        self._by_key[key] = fresh
        return fresh
