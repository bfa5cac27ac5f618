"""The follower's state machine: what a client knows of its decision, and what each answer does.

Pure of I/O (the faces in :mod:`vlm_optimizer_client.follow` fetch): an answer or a failure goes in,
the seconds to wait before the next poll come out, and the callbacks fire in order.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from vlm_optimizer_client._torch import default_cleanup
from vlm_optimizer_client.decision import BadAnswer, _describe, _error_of, _gpu_identity, _header, parse_decision

log = logging.getLogger("vlm_optimizer_client")

BACKOFF_BASE_S: Final = 1.0  # the first retry comes within 1 s of a failure ...
BACKOFF_MAX_S: Final = 60.0  # ... each following within twice that, never beyond 60 s

OnChange = Callable[[int, dict[str, Any]], object]
"""``on_change(new_batch_size, decision)``: ``decision`` is the last decision received (a stale one
when the value fell back to the safe batch size)."""
OnCleanup = Callable[[int], object]
"""``on_cleanup(epoch)``: the optimizer raised a cleanup for the service's GPU."""


class _Follower:
    """What a client knows of its decision, and what it does on each answer or failure.

    Pure of I/O: the faces fetch, then hand the outcome to :meth:`on_answer` or :meth:`on_failure`,
    which return the seconds to wait before the next poll. ``now`` is the client's clock (seconds,
    monotonic). Thread-safe: the value may be read from any thread while the poller updates it;
    transitions and the callbacks they fire are serialized, so callbacks see changes in order.

    Callbacks run on the thread that drove the transition (the poller, or the caller of
    :meth:`apply`); one that raises is logged and otherwise ignored.
    """

    def __init__(self, *, target: str, interval: float, safe_batch_size: int, max_staleness: float,
                 on_change: OnChange | None, on_cleanup: OnCleanup | None, rng: random.Random) -> None:
        self.target = target  # for the logs: the URL polled
        self.interval = interval
        self.safe_batch_size = safe_batch_size
        self.max_staleness = max_staleness
        self._on_change = on_change
        self._on_cleanup = on_cleanup
        self._rng = rng
        self._lock = threading.Lock()  # the state, held briefly
        self._serial = threading.RLock()  # one transition (and its callbacks) at a time
        self.decision: dict[str, Any] | None = None
        self.good_batch: int | None = None  # the batch size of the last good answer
        self.good_at: float | None = None  # when it came (client clock)
        self.etag: str | None = None
        self.failures = 0  # consecutive
        self.outage = False
        self.outage_since: float | None = None
        self.last_status: int | None = None  # of the last answer; None when the last poll got none
        self.last_error: str | None = None
        self.epoch: int | None = None  # the cleanup epoch seen last (None before the first decision)
        self._epoch_gpu: object = None
        self._exposed = safe_batch_size  # the value the callbacks were last told about

    # ------------------------------------------------------------------ reading

    def value(self, now: float) -> int:
        """The batch size to run: the last good one while fresh, else the safe one. No side effects."""
        with self._lock:
            return self._value(now)

    def _value(self, now: float) -> int:
        if self.good_batch is None or self.good_at is None or now - self.good_at >= self.max_staleness:
            return self.safe_batch_size
        return self.good_batch

    # ------------------------------------------------------------------ transitions

    def on_answer(self, status: int, headers: Mapping[str, str], body: bytes, now: float) -> float:
        """An HTTP answer to a poll. A 200 with a decision or a 304 (with a decision known) is good;
        anything else counts as a failure. Returns the delay before the next poll (seconds)."""
        with self._serial:
            pending: list[Callable[[], None]] = []
            with self._lock:
                self.last_status = status
                if status == 200:
                    try:
                        decision = parse_decision(body)
                    except BadAnswer as exc:
                        delay = self._fail(f"HTTP 200 with a bad body: {exc}", now)
                    else:
                        self._take(decision, _header(headers, "ETag"), now, pending)
                        delay = self._succeed(now)
                elif status == 304 and self.decision is not None:
                    self.good_at = now
                    etag = _header(headers, "ETag")
                    if etag:
                        self.etag = etag
                    delay = self._succeed(now)
                elif status == 304:
                    self.etag = None  # a 304 to nothing: ask afresh next time
                    delay = self._fail("HTTP 304 without a decision to keep", now)
                else:
                    delay = self._fail(_error_of(status, body), now)
                self._settle(now, pending)
            self._run(pending)
            return delay

    def on_failure(self, error: BaseException | str, now: float) -> float:
        """A poll that got no answer (connection refused, timeout, DNS, reset...). Returns the delay
        before the next poll (seconds): full-jitter exponential backoff."""
        with self._serial:
            pending: list[Callable[[], None]] = []
            with self._lock:
                self.last_status = None
                delay = self._fail(_describe(error), now)
                self._settle(now, pending)
            self._run(pending)
            return delay

    def apply(self, decision: Mapping[str, Any], now: float, etag: str | None = None) -> bool:
        """Take a decision that came another way (the reply to ``POST /reports``).

        Returns ``False`` (and logs) when ``decision`` is not one. Without ``etag`` the stored one is
        dropped, so that the next poll fetches the body rather than confirming an older decision.
        The outage state is left to the polls.
        """
        try:
            parsed = parse_decision(decision)
        except BadAnswer as exc:
            log.warning("ignoring a decision for %s that is not one: %s", self.target, exc)
            return False
        with self._serial:
            pending: list[Callable[[], None]] = []
            with self._lock:
                self._take(parsed, etag, now, pending)
                self._settle(now, pending)
            self._run(pending)
        return True

    # ------------------------------------------------------------------ internals (under the lock)

    def _take(self, decision: dict[str, Any], etag: str | None, now: float,
              pending: list[Callable[[], None]]) -> None:
        self.decision = decision
        self.good_batch = int(decision["batch_size"])
        self.good_at = now
        self.etag = etag or None
        epoch = decision.get("cleanup_epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return
        gpu = _gpu_identity(decision)
        if self.epoch is None or gpu != self._epoch_gpu or epoch < self.epoch:
            # The first value, another GPU, or an optimizer that restarted: a new baseline, no cleanup.
            if self.epoch is not None and epoch < self.epoch:
                log.info("cleanup epoch went back from %d to %d (optimizer restarted?)",
                         self.epoch, epoch)
            self.epoch, self._epoch_gpu = epoch, gpu
        elif epoch > self.epoch:
            self.epoch = epoch
            pending.append(lambda: self._cleanup(epoch))

    def _succeed(self, now: float) -> float:
        if self.outage:
            since = self.outage_since if self.outage_since is not None else now
            log.info("optimizer at %s answers again after %.1f s (%d failed polls); "
                     "batch size %d", self.target, now - since, self.failures, self._value(now))
        self.failures = 0
        self.outage = False
        self.outage_since = None
        self.last_error = None
        return self.interval

    def _fail(self, error: str, now: float) -> float:
        self.failures += 1
        self.last_error = error
        if not self.outage:
            self.outage = True
            self.outage_since = now
            if self.good_at is not None and self._value(now) != self.safe_batch_size:
                plan = (f"keeping batch size {self._value(now)} for {self.good_at + self.max_staleness - now:.0f} s"
                        f" more, then {self.safe_batch_size}")
            else:
                plan = f"running the safe batch size {self.safe_batch_size}"
            log.warning("optimizer at %s failed (%s); %s; retrying with backoff",
                        self.target, error, plan)
        else:
            log.debug("poll %d of an outage failed: %s", self.failures, error)
        hi = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(self.failures - 1, 30))
        delay = self._rng.uniform(0.0, hi)
        if self.good_at is not None and self.good_batch != self.safe_batch_size:
            until_stale = self.good_at + self.max_staleness - now
            if until_stale > 0:  # wake up when the value expires, to tell on_change in time
                delay = min(delay, until_stale)
        return delay

    def _settle(self, now: float, pending: list[Callable[[], None]]) -> None:
        value = self._value(now)
        if value == self._exposed:
            return
        self._exposed = value
        if self.good_at is not None and value != self.good_batch:  # the value expired
            log.info("last decision from %s is %.0f s old; falling back to the safe batch size %d",
                     self.target, now - self.good_at, value)
        decision = copy.deepcopy(self.decision) if self.decision is not None else {}
        pending.append(lambda: self._changed(value, decision))

    # ------------------------------------------------------------------ callbacks (outside the lock)

    def _changed(self, value: int, decision: dict[str, Any]) -> None:
        if self._on_change is not None:
            self._on_change(value, decision)

    def _cleanup(self, epoch: int) -> None:
        if self._on_cleanup is not None:
            self._on_cleanup(epoch)
        else:
            default_cleanup()

    @staticmethod
    def _run(pending: list[Callable[[], None]]) -> None:
        for call in pending:
            try:
                call()
            except Exception:
                log.exception("a callback raised; polling goes on")
