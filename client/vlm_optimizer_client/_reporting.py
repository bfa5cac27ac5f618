"""The reporter's core: the buffer, the aggregation, and what each reply means (everything but the faces).

Both faces (:mod:`vlm_optimizer_client.telemetry`) drive one :class:`_Core`, so the aggregation, retry
and logging rules are written once. Its :meth:`_Core.cycle` yields each report body to send and takes
its outcome; :meth:`_Core.post` is the blocking transport (the reporter's one kept connection,
:class:`~vlm_optimizer_client._http.KeepAlive`).
"""

from __future__ import annotations

import http.client
import json
import logging
import operator
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

from vlm_optimizer_client import validate
from vlm_optimizer_client._http import KeepAlive
from vlm_optimizer_client._torch import gpu_identity
from vlm_optimizer_client.identity import pod_from_env

log = logging.getLogger("vlm_optimizer_client")

DEFAULT_MAX_PENDING = 1024
MAX_REPLY_BYTES = 1 << 20
USER_AGENT = "vlm-gpu-optimizer-client"
# The optimizer is a neighbour (a cluster Service, localhost): no proxy from the environment, as
# vlm_optimizer_client.follow (KeepAlive connects directly; the aiohttp sessions have trust_env=False).


class DecisionSink(Protocol):
    """Where a report's reply goes: a follower of ``GET /batch-size`` (``BatchSizeClient`` is one).

    Called on the sending thread (the event loop for :class:`AsyncReporter`); what it returns is ignored,
    and what it raises is logged.
    """

    def apply_decision(self, decision: dict[str, Any]) -> object: ...


@dataclass(frozen=True)
class Measurement:
    """What one :meth:`Reporter.report` call says; bytes are bytes, ``None`` when not measured."""

    batch_size: int
    peak_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    inactive_split_bytes: int | None = None
    oom: bool = False


@dataclass(frozen=True)
class ReporterStats:
    """Counters since the reporter was made.

    ``queued``: measurements accepted; ``invalid``: refused by :meth:`Reporter.report` (bad figures);
    ``dropped``: pushed out of the full buffer, oldest first; ``sent``: reports the optimizer answered
    with a decision; ``rejected``: reports it refused (4xx), not retried; ``failed``: sends that did not
    reach it or that it failed (5xx), retried; ``outages``: runs of failed sends; ``pending``: in the
    buffer now.
    """

    queued: int = 0
    invalid: int = 0
    dropped: int = 0
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    outages: int = 0
    pending: int = 0


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any  # the parsed JSON, None when the body was not JSON


@dataclass(frozen=True)
class _Failure:
    error: str


_Outcome = _Reply | _Failure
_Cycle = Generator[dict[str, Any], _Outcome, None]


def _count(value: Any, name: str, lo: int) -> int | None:
    if value is None:
        return None
    # a bool, or a bool tensor (PyTorch's __index__ turns torch.tensor(True) into 1): not a count
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool":
        validate.fail(name, f"an integer >= {lo}", value)
    try:
        n = operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        validate.fail(name, f"an integer >= {lo}", value)
    return validate.integer(name, n, lo)


def _merge(items: list[Measurement]) -> Measurement | None:
    """One report of measurements that are not OOMs: the latest batch size, the highest peak measured at
    it (a peak at another size says nothing of this one), and the latest of each allocator figure."""
    if not items:
        return None
    batch = items[-1].batch_size
    peaks = [m.peak_bytes for m in items if m.batch_size == batch and m.peak_bytes is not None]

    def latest(field: str) -> int | None:
        for m in reversed(items):
            v = cast(int | None, getattr(m, field))
            if v is not None:
                return v
        return None

    return Measurement(batch, max(peaks) if peaks else None, latest("allocated_bytes"), latest("reserved_bytes"),
                       latest("inactive_split_bytes"))


class _Core:
    """The buffer, the aggregation, and what each reply means: everything but the I/O.

    Thread-safe: :meth:`add` may be called from any thread while a cycle runs in another.
    """

    def __init__(self, service: str, url: str | None, gpu: int | str | None, interval: float, timeout: float,
                 sink: DecisionSink | None, max_pending: int) -> None:
        validate.service(service)
        base = validate.optimizer_url(url)
        validate.seconds("interval", interval)
        validate.seconds("timeout", timeout)
        validate.integer("max_pending", max_pending, 1)
        validate.gpu(gpu)
        self.service = service
        self.url = base
        self.endpoint = f"{base}/reports"
        self.gpu: int | str | None = gpu
        self.gpu_auto = gpu is None  # found from torch at the first report; dropped if the optimizer refuses it
        self.pod = pod_from_env()  # tells the optimizer which GPU this pod uses (Kubernetes discovery)
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.sink = sink
        self.max_pending = max_pending
        self.http = KeepAlive(base, self.timeout)  # the sync reporter's connection (the async one's without aiohttp)
        self._lock = threading.Lock()
        self._buffer: deque[Measurement] = deque()
        self._stats = ReporterStats()
        self._outage = False
        self._outage_failures = 0
        self._last_rejection: str | None = None

    # ------------------------------------------------------------------ intake (any thread)

    def add(self, batch_size: Any, peak_bytes: Any, allocated_bytes: Any, reserved_bytes: Any,
            inactive_split_bytes: Any, oom: Any) -> bool:
        """Buffer one measurement; True when it is urgent (an OOM). Never raises."""
        try:
            if batch_size is None:
                validate.fail("batch_size", "an integer >= 1", None)
            m = Measurement(cast(int, _count(batch_size, "batch_size", 1)), _count(peak_bytes, "peak_bytes", 0),
                            _count(allocated_bytes, "allocated_bytes", 0), _count(reserved_bytes, "reserved_bytes", 0),
                            _count(inactive_split_bytes, "inactive_split_bytes", 0), bool(oom))
        except Exception as exc:
            with self._lock:
                self._stats = replace(self._stats, invalid=self._stats.invalid + 1)
                first = self._stats.invalid == 1
            # the hot path: a warning the first time, then quietly (the count is in stats.invalid)
            (log.warning if first else log.debug)("telemetry_invalid %s: measurement not reported: %s",
                                                  self.service, exc)
            return False
        if self.gpu_auto and self.gpu is None:
            found = gpu_identity()  # in the caller's thread: torch's current device is per thread
            if found is not None:
                with self._lock:
                    if self.gpu_auto and self.gpu is None:
                        self.gpu = found
        with self._lock:
            dropped = self._bound(1)
            self._buffer.append(m)
            self._stats = replace(self._stats, queued=self._stats.queued + 1, dropped=self._stats.dropped + dropped)
        if dropped:
            log.debug("telemetry_dropped %s: buffer full (%d), oldest measurement dropped", self.service,
                      self.max_pending)
        return m.oom

    def _bound(self, room: int) -> int:
        """Make room for ``room`` more by dropping the oldest; how many were dropped (lock held)."""
        dropped = 0
        while self._buffer and len(self._buffer) + room > self.max_pending:
            self._buffer.popleft()
            dropped += 1
        return dropped

    @property
    def stats(self) -> ReporterStats:
        with self._lock:
            return replace(self._stats, pending=len(self._buffer))

    def has_urgent(self) -> bool:
        with self._lock:
            return any(m.oom for m in self._buffer)

    # ------------------------------------------------------------------ sending (one cycle at a time)

    def _take(self, urgent_only: bool) -> list[Measurement]:
        """The reports to send now: each OOM alone, then one aggregate of the rest (unless urgent_only)."""
        with self._lock:
            if urgent_only:
                ooms = [m for m in self._buffer if m.oom]
                if ooms:
                    self._buffer = deque(m for m in self._buffer if not m.oom)
                return ooms
            items, self._buffer = list(self._buffer), deque()
        merged = _merge([m for m in items if not m.oom])
        return [m for m in items if m.oom] + ([merged] if merged is not None else [])

    def _put_back(self, unsent: list[Measurement]) -> None:
        """Unsent reports go back in front of what came since, the oldest dropped past the bound."""
        with self._lock:
            self._buffer.extendleft(reversed(unsent))
            dropped = self._bound(0)
            self._stats = replace(self._stats, dropped=self._stats.dropped + dropped)

    def body(self, m: Measurement) -> dict[str, Any]:
        body: dict[str, Any] = {"service": self.service, "batch_size": m.batch_size}
        if self.gpu is not None:
            body["gpu"] = self.gpu
        if self.pod is not None:
            body["pod"] = self.pod
        for key in ("peak_bytes", "allocated_bytes", "reserved_bytes", "inactive_split_bytes"):
            v = getattr(m, key)
            if v is not None:
                body[key] = v
        if m.oom:
            body["oom"] = True
            body.pop("peak_bytes", None)  # the optimizer learns peaks from batches that finished
        return body

    def cycle(self, urgent_only: bool = False) -> _Cycle:
        """Yield each report body to send, and take its outcome; stops at the first failure.

        Unsent reports are put back for the next cycle.
        """
        todo = self._take(urgent_only)
        for i, m in enumerate(todo):
            while True:
                outcome = yield self.body(m)
                if isinstance(outcome, _Failure) or outcome.status >= 500 or (
                        outcome.status < 400 and not isinstance(outcome.body, dict)):
                    self._failed(outcome)
                    self._put_back(todo[i:])
                    return
                if outcome.status >= 400:
                    if self._refused_gpu(outcome):
                        continue  # again, without the GPU
                    self._rejected(m, outcome)
                else:
                    self._succeeded(cast(dict[str, Any], outcome.body))
                break

    def _failed(self, outcome: _Outcome) -> None:
        why = outcome.error if isinstance(outcome, _Failure) else f"HTTP {outcome.status}: {_error_of(outcome)}"
        with self._lock:
            first = not self._outage
            self._outage = True
            self._outage_failures += 1
            self._stats = replace(self._stats, failed=self._stats.failed + 1,
                                  outages=self._stats.outages + (1 if first else 0))
            pending = len(self._buffer)
        if first:
            log.warning("optimizer_unreachable %s: %s at %s; keeping up to %d measurements and retrying every %g s",
                        self.service, why, self.endpoint, self.max_pending, self.interval,
                        extra={"service": self.service, "url": self.endpoint})
        else:
            log.debug("optimizer still unreachable (%s), %d measurements pending", why, pending)

    def _reached(self, counter: str) -> None:
        """The optimizer answered (a decision or a refusal): an outage, if any, is over."""
        with self._lock:
            recovered, failures = self._outage, self._outage_failures
            self._outage, self._outage_failures = False, 0
            self._stats = replace(self._stats, **{counter: getattr(self._stats, counter) + 1})
        if recovered:
            log.info("optimizer_reachable %s: the optimizer answers again after %d failed sends", self.service,
                     failures, extra={"service": self.service, "url": self.endpoint})

    def _succeeded(self, decision: dict[str, Any]) -> None:
        self._reached("sent")
        if self.sink is not None:
            try:
                self.sink.apply_decision(decision)
            except Exception:
                log.exception("the decision sink failed on a report's reply")

    def _refused_gpu(self, outcome: _Reply) -> bool:
        """The optimizer does not know the GPU found from torch (a MIG, another naming): go without it."""
        if not (self.gpu_auto and self.gpu is not None and outcome.status == 400
                and isinstance(outcome.body, dict) and outcome.body.get("field") == "gpu"):
            return False
        log.warning("gpu_unknown %s: the optimizer does not know GPU %s (%s); reporting without a GPU",
                    self.service, self.gpu, _error_of(outcome))
        with self._lock:
            self.gpu_auto, self.gpu = False, None
        return True

    def _rejected(self, m: Measurement, outcome: _Reply) -> None:
        error = f"HTTP {outcome.status}: {_error_of(outcome)}"
        self._reached("rejected")
        with self._lock:
            repeated, self._last_rejection = error == self._last_rejection, error
        (log.debug if repeated else log.warning)(
            "report_rejected %s: the optimizer refused a report (%s), dropped: %s", self.service,
            "oom" if m.oom else f"batch {m.batch_size}", error, extra={"service": self.service, "status": outcome.status})

    # ------------------------------------------------------------------ blocking transport

    def post(self, body: dict[str, Any]) -> _Outcome:
        """POST one report over the kept connection (blocks up to ``timeout`` per socket operation); never
        raises. Retried on a new connection only when the kept one failed while sending it (``KeepAlive``):
        a report the optimizer may have taken is not sent twice at once."""
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}
        try:
            status, _, raw, _ = self.http.request("POST", self.endpoint, body=json.dumps(body).encode(),
                                                  headers=headers, limit=MAX_REPLY_BYTES, idempotent=False)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return _Failure(f"{type(exc).__name__}: {exc}")
        return _Reply(status, _parse(raw))


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _error_of(outcome: _Reply) -> str:
    if isinstance(outcome.body, dict) and isinstance(outcome.body.get("error"), str):
        return cast(str, outcome.body["error"])[:300]
    return "no JSON error in the reply"


def _drive(cycle: _Cycle, post: Callable[[dict[str, Any]], _Outcome]) -> None:
    try:
        body = next(cycle)
        while True:
            body = cycle.send(post(body))
    except StopIteration:
        return


async def _drive_async(cycle: _Cycle, post: Callable[[dict[str, Any]], Awaitable[_Outcome]]) -> None:
    try:
        body = next(cycle)
        while True:
            body = cycle.send(await post(body))
    except StopIteration:
        return


class _CoreView:
    """What both reporters show of their shared :class:`_Core` (read-only)."""

    _core: _Core

    @property
    def service(self) -> str:
        return self._core.service

    @property
    def url(self) -> str:
        return self._core.url

    @property
    def gpu(self) -> int | str | None:
        return self._core.gpu

    @property
    def stats(self) -> ReporterStats:
        return self._core.stats
