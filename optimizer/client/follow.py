"""Follow the optimizer's batch size (``GET /batch-size``) from a VLM service.

Two faces over one state machine (:class:`_Follower`):

- :class:`BatchSizeClient` polls from a daemon thread with :mod:`urllib` (no dependency);
- :class:`AsyncBatchSizeClient` polls from an asyncio task, with :mod:`aiohttp` when it is
  installed and with :mod:`urllib` in a worker thread (:func:`asyncio.to_thread`) when it is not.

Both expose ``batch_size``: the last batch size the optimizer published while that answer is fresh
(younger than ``max_staleness`` seconds), else ``safe_batch_size``. Reading it does no I/O and never
blocks on the network. The optimizer being down, slow, or answering garbage never raises into the
service: every such failure is counted, polls back off exponentially (full jitter, 1 s doubling to
60 s), and one warning is logged when an outage starts and one info line when it ends.

Polls send ``If-None-Match`` with the last ``ETag``, so an unchanged decision costs a 304 and no body.

This module imports nothing of the server: only the standard library, plus :mod:`aiohttp` (lazily,
async face only) and :mod:`torch` (only if the service already imported it, in :func:`default_cleanup`).
Logs go to the standard :mod:`logging` logger ``optimizer.client``.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

from optimizer.client.identity import pod_from_env

__all__ = [
    "AsyncBatchSizeClient",
    "BadAnswer",
    "BatchSizeClient",
    "DEFAULT_URL",
    "URL_ENV",
    "default_cleanup",
    "parse_decision",
]

log = logging.getLogger("optimizer.client")

URL_ENV: Final = "VLM_OPTIMIZER_URL"
DEFAULT_URL: Final = "http://127.0.0.1:8080"
BACKOFF_BASE_S: Final = 1.0  # the first retry comes within 1 s of a failure ...
BACKOFF_MAX_S: Final = 60.0  # ... each following within twice that, never beyond 60 s
MAX_BODY_BYTES: Final = 1 << 20  # an answer bigger than this is not a decision
USER_AGENT: Final = "vlm-gpu-optimizer-client"

# The server's rules for its query parameters (docs/api.md), checked here so that a misconfigured
# service fails at start-up rather than polling into 400s forever.
_SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_GPU_UUID_RE: Final = re.compile(r"(GPU|MIG)-[A-Za-z0-9-]{1,100}")
_MIG_SELECTOR_RE: Final = re.compile(r"[0-9]{1,2}:[0-9]{1,2}(:[0-9]{1,2})?")  # parent:gpu_instance[:compute]
_MAX_GPU_INDEX: Final = 66559  # a MIG device's index may exceed 1023 (docs/architecture.md, "MIG")

Clock = Callable[[], float]
OnChange = Callable[[int, dict[str, Any]], object]
"""``on_change(new_batch_size, decision)``: ``decision`` is the last decision received (a stale one
when the value fell back to the safe batch size)."""
OnCleanup = Callable[[int], object]
"""``on_cleanup(epoch)``: the optimizer raised a cleanup for the service's GPU."""


class BadAnswer(ValueError):
    """The optimizer answered, but not with a decision (a non-JSON body, a missing or mistyped field,
    an HTTP error status)."""


# --------------------------------------------------------------------------- helpers


def default_cleanup() -> None:
    """What a service does when the optimizer raises a cleanup: collect garbage, empty the CUDA cache.

    Runs :func:`gc.collect`, then ``torch.cuda.empty_cache()`` if PyTorch is already imported by the
    service and CUDA is available. PyTorch is never imported here: a process that did not import it
    has no CUDA allocator cache to empty. Raises nothing that PyTorch does not raise.
    """
    gc.collect()
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _natural_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _string(v: object) -> bool:
    return isinstance(v, str)


def _object_or_null(v: object) -> bool:
    return v is None or isinstance(v, dict)


# field -> (check, what it must be): batch_size is required, the others are checked when present
_REQUIRED: Final[dict[str, tuple[Callable[[object], bool], str]]] = {
    "batch_size": (_positive_int, "an integer >= 1"),
}
_OPTIONAL: Final[dict[str, tuple[Callable[[object], bool], str]]] = {
    "cleanup_epoch": (_natural_int, "an integer >= 0"),
    "optimal_batch_size": (_positive_int, "an integer >= 1"),
    "service": (_string, "a string"),
    "strategy": (_string, "a string"),
    "pressure": (_string, "a string"),
    "reason": (_string, "a string"),
    "updated_at": (_is_number, "a number"),
    "gpu": (_object_or_null, "an object or null"),
}


def parse_decision(body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """A decision of the optimizer (the body of ``GET /batch-size`` or of the reply to ``POST /reports``).

    ``body`` is the raw body (bytes, UTF-8) or the already decoded JSON object. Returns a new dict.
    ``batch_size`` is required (an integer >= 1); the other documented fields are checked when present
    (``cleanup_epoch`` an integer >= 0, ``optimal_batch_size`` an integer >= 1, ``service``,
    ``strategy``, ``pressure``, ``reason`` strings, ``updated_at`` a number, ``gpu`` an object or
    null). Unknown fields are kept. Raises :class:`BadAnswer` (a :class:`ValueError`) otherwise.
    """
    if isinstance(body, (bytes, str)):
        try:
            obj: object = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadAnswer(f"not JSON ({exc})") from None
    else:
        obj = body
    if not isinstance(obj, Mapping):
        raise BadAnswer(f"not a JSON object: {type(obj).__name__}")
    for key, (ok, what) in _REQUIRED.items():
        if key not in obj:
            raise BadAnswer(f"no {key}")
        if not ok(obj[key]):
            raise BadAnswer(f"{key} must be {what}, got {obj[key]!r:.64}")
    for key, (ok, what) in _OPTIONAL.items():
        if key in obj and not ok(obj[key]):
            raise BadAnswer(f"{key} must be {what}, got {obj[key]!r:.64}")
    return dict(obj)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name, whatever the case of the mapping's keys."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for k, v in headers.items():
        if k.lower() == lower:
            return v
    return None


def _error_of(status: int, body: bytes) -> str:
    """A one-line description of an HTTP error answer, with the server's message when it sent one."""
    detail = ""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            detail = f": {obj['error']}"
    except (ValueError, RecursionError):
        pass
    return f"HTTP {status}{detail}"[:300]


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason  # "URLError: <urlopen error [Errno 111] ...>" says less than its reason
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _gpu_identity(decision: Mapping[str, Any]) -> object:
    """What tells the GPU a decision is about apart: its UUID, else its index (``None`` without GPU)."""
    gpu = decision.get("gpu")
    if not isinstance(gpu, dict):
        return None
    return gpu.get("uuid") or gpu.get("index")


# --------------------------------------------------------------------------- the state machine


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


# --------------------------------------------------------------------------- transport


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # like aiohttp: no proxy from env


def _read_capped(read: Callable[[int], bytes]) -> bytes:
    body = read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise BadAnswer(f"answer over {MAX_BODY_BYTES} bytes")
    return body


def _request_headers(etag: str | None, transport: str) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": f"{USER_AGENT} ({transport})"}
    if etag:
        headers["If-None-Match"] = etag
    return headers


def _fetch_sync(url: str, etag: str | None, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One GET with urllib: (status, headers, body). HTTP error statuses are returned, not raised.

    ``timeout`` (seconds) bounds the connection and each read. Raises :class:`OSError` (URLError,
    timeouts, resets), :class:`http.client.HTTPException` or :class:`BadAnswer` (body too large).
    """
    request = urllib.request.Request(url, headers=_request_headers(etag, "urllib"), method="GET")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return int(resp.status), dict(resp.headers.items()), _read_capped(resp.read)
    except urllib.error.HTTPError as exc:  # 304, 4xx, 5xx: an answer all the same
        with exc:
            headers = dict(exc.headers.items()) if exc.headers is not None else {}
            try:
                body = _read_capped(exc.read)
            except (OSError, ValueError, AttributeError):
                body = b""
            return int(exc.code), headers, body


def _load_aiohttp() -> Any:
    """The aiohttp module, or ``None`` when it is not installed."""
    try:
        import aiohttp
    except ImportError:
        return None
    return aiohttp


# --------------------------------------------------------------------------- the faces


def _check_float(name: str, value: object, *, positive: bool = True) -> float:
    if not _is_number(value):
        raise ValueError(f"{name}: must be a finite number of seconds, got {value!r}")
    assert isinstance(value, (int, float))
    if positive and value <= 0:
        raise ValueError(f"{name}: must be > 0 seconds, got {value!r}")
    return float(value)


class _Base:
    """The constructor, the validation and the read-only view both faces share."""

    def __init__(self, service: str, url: str | None = None, gpu: int | str | None = None, interval: float = 5.0,
                 safe_batch_size: int = 1, max_staleness: float = 60.0, timeout: float = 2.0,
                 on_change: OnChange | None = None, on_cleanup: OnCleanup | None = None,
                 clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        if not isinstance(service, str) or not _SERVICE_RE.fullmatch(service):
            raise ValueError(f"service: must be 1-128 characters (letters, digits, . _ : / -) starting with a "
                             f"letter or digit, got {service!r:.64}")
        if gpu is not None:
            if isinstance(gpu, bool) or not isinstance(gpu, (int, str)):
                raise ValueError(f"gpu: must be a GPU index or UUID, got {gpu!r:.64}")
            if isinstance(gpu, int) and not 0 <= gpu <= _MAX_GPU_INDEX:
                raise ValueError(f"gpu: must be a GPU index in [0, {_MAX_GPU_INDEX}], got {gpu}")
            if isinstance(gpu, str) and not (re.fullmatch(r"[0-9]{1,5}", gpu) or _GPU_UUID_RE.fullmatch(gpu)
                                             or _MIG_SELECTOR_RE.fullmatch(gpu)):
                raise ValueError(f"gpu: must be a GPU index (0, 1, ...), a UUID (GPU-..., MIG-...) or a MIG "
                                 f"device as parent:instance (e.g. 0:1), got {gpu!r:.64}")
        self._interval = _check_float("interval", interval)
        if not _is_int(safe_batch_size) or safe_batch_size < 1:
            raise ValueError(f"safe_batch_size: must be an integer >= 1, got {safe_batch_size!r}")
        self._max_staleness = _check_float("max_staleness", max_staleness)
        self._timeout = _check_float("timeout", timeout)
        base = url if url is not None else (os.environ.get(URL_ENV) or DEFAULT_URL)
        if not isinstance(base, str):
            raise ValueError(f"url: must be a string, got {base!r:.64}")
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"url: must be http:// or https:// with a host and no query, got {base!r:.200}")
        self.service = service
        self.gpu = gpu
        self.base_url = base.rstrip("/")
        query = {"service": service} if gpu is None else {"service": service, "gpu": str(gpu)}
        pod = pod_from_env()
        if pod is not None:
            query["pod"] = pod
        self.url = f"{self.base_url}/batch-size?{urllib.parse.urlencode(query)}"
        self._clock = clock
        self._core = _Follower(target=self.url, interval=self._interval, safe_batch_size=safe_batch_size,
                               max_staleness=self._max_staleness, on_change=on_change, on_cleanup=on_cleanup,
                               rng=rng if rng is not None else random.Random())

    @property
    def batch_size(self) -> int:
        """The batch size to run now: the optimizer's while its last answer is younger than
        ``max_staleness`` seconds, else ``safe_batch_size``. No I/O; never raises."""
        return self._core.value(self._clock())

    @property
    def decision(self) -> dict[str, Any] | None:
        """A copy of the last decision received (fresh or not), ``None`` before the first."""
        with self._core._lock:
            return copy.deepcopy(self._core.decision)

    @property
    def cleanup_epoch(self) -> int | None:
        """The last cleanup epoch seen, ``None`` before the first decision."""
        return self._core.epoch

    @property
    def healthy(self) -> bool:
        """``False`` from the first failed poll of an outage until a poll succeeds again."""
        return not self._core.outage

    @property
    def consecutive_failures(self) -> int:
        """Failed polls since the last good one."""
        return self._core.failures

    @property
    def last_status(self) -> int | None:
        """The HTTP status of the last poll's answer (200, 304, ...); ``None`` when it got none."""
        return self._core.last_status

    @property
    def last_error(self) -> str | None:
        """Why the last poll failed (one line); ``None`` after a good one."""
        return self._core.last_error

    @property
    def etag(self) -> str | None:
        """The ETag sent as ``If-None-Match`` on the next poll."""
        return self._core.etag

    def apply_decision(self, decision: Mapping[str, Any], etag: str | None = None) -> bool:
        """Take a decision received another way, at once (the reply to ``POST /reports``, which has
        the same body, and ``etag`` its ``ETag`` header). Fires the callbacks as a poll would.

        Returns ``False`` (and logs a warning) when ``decision`` is not a decision; never raises for it.
        """
        return self._core.apply(decision, self._clock(), etag)


class BatchSizeClient(_Base):
    """Follow the optimizer from a daemon thread (urllib; no dependency).

    ``service``: the name the optimizer knows the service by. ``url``: the optimizer's read API
    (default: ``$VLM_OPTIMIZER_URL``, else ``http://127.0.0.1:8080``). ``gpu``: an index or UUID, or
    ``None`` for the optimizer's choice. ``interval``: seconds between polls while the optimizer
    answers. ``safe_batch_size``: what runs before the first answer and once the last answer is
    ``max_staleness`` seconds old. ``timeout``: seconds for the connection and each read.
    ``on_change(batch_size, decision)``: the value changed (also to and from the safe size).
    ``on_cleanup(epoch)``: the GPU's cleanup epoch rose (default: :func:`default_cleanup`).
    ``clock``: monotonic seconds (for staleness and outage durations). ``rng``: for the backoff jitter.

    Callbacks run on the polling thread. Raises :class:`ValueError` naming the argument for an
    invalid one (``interval``, ``max_staleness`` or ``timeout`` <= 0, ``safe_batch_size`` < 1, a
    ``url`` not ``http``/``https``, a malformed ``service`` or ``gpu``).
    """

    def __init__(self, service: str, url: str | None = None, gpu: int | str | None = None, interval: float = 5.0,
                 safe_batch_size: int = 1, max_staleness: float = 60.0, timeout: float = 2.0,
                 on_change: OnChange | None = None, on_cleanup: OnCleanup | None = None,
                 clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        super().__init__(service, url, gpu, interval, safe_batch_size, max_staleness, timeout, on_change,
                         on_cleanup, clock, rng)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> float:
        """One ``GET /batch-size`` (blocking, at most about ``timeout`` seconds per socket operation).
        Returns the seconds to wait before the next poll. Never raises for the optimizer's sake."""
        try:
            status, headers, body = _fetch_sync(self.url, self._core.etag, self._timeout)
        except Exception as exc:  # URLError, timeouts, resets, HTTPException, BadAnswer...
            return self._core.on_failure(exc, self._clock())
        return self._core.on_answer(status, headers, body, self._clock())

    @property
    def running(self) -> bool:
        """Whether the polling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start polling from a daemon thread (the first poll at once). Does nothing if it runs."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"optimizer-follow-{self.service}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling. Returns at once when the thread waits between polls; a poll in flight is
        waited for (bounded by ``timeout`` per socket operation)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._timeout * 3 + 1.0)

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self.poll_once()
            except Exception:  # a bug here must not end the thread silently
                log.exception("poll failed unexpectedly")
                delay = self._interval

    def __enter__(self) -> BatchSizeClient:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class AsyncBatchSizeClient(_Base):
    """Follow the optimizer from an asyncio task (aiohttp if installed, else urllib in a thread).

    The same arguments, validation and reading as :class:`BatchSizeClient`. Callbacks run on the
    event loop's thread: keep them short.
    """

    def __init__(self, service: str, url: str | None = None, gpu: int | str | None = None, interval: float = 5.0,
                 safe_batch_size: int = 1, max_staleness: float = 60.0, timeout: float = 2.0,
                 on_change: OnChange | None = None, on_cleanup: OnCleanup | None = None,
                 clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        super().__init__(service, url, gpu, interval, safe_batch_size, max_staleness, timeout, on_change,
                         on_cleanup, clock, rng)
        self._task: asyncio.Task[None] | None = None

    async def poll_once(self) -> float:
        """One ``GET /batch-size``. Returns the seconds to wait before the next poll. Never raises for
        the optimizer's sake (:class:`asyncio.CancelledError` passes through)."""
        try:
            status, headers, body = await self._fetch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # aiohttp.ClientError, TimeoutError, OSError, BadAnswer...
            return self._core.on_failure(exc, self._clock())
        return self._core.on_answer(status, headers, body, self._clock())

    async def _fetch(self) -> tuple[int, dict[str, str], bytes]:
        aiohttp_mod = _load_aiohttp()
        if aiohttp_mod is None:
            return await asyncio.to_thread(_fetch_sync, self.url, self._core.etag, self._timeout)
        # A session per poll: no connection outlives it, nothing to close at exit, and no session bound
        # to an event loop that has ended (a service may poll from successive asyncio.run calls). One
        # connection per interval costs nothing next to the interval.
        async with aiohttp_mod.ClientSession(timeout=aiohttp_mod.ClientTimeout(total=self._timeout),
                                             trust_env=False) as session:
            async with session.get(self.url, headers=_request_headers(self._core.etag, "aiohttp")) as resp:
                body = await resp.content.read(MAX_BODY_BYTES + 1)
                if len(body) > MAX_BODY_BYTES:
                    raise BadAnswer(f"answer over {MAX_BODY_BYTES} bytes")
                return int(resp.status), dict(resp.headers.items()), body

    @property
    def running(self) -> bool:
        """Whether the polling task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling in a task of the running loop (the first poll at once). Does nothing if it
        runs. Raises :class:`RuntimeError` outside a running event loop."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"optimizer-follow-{self.service}")

    async def stop(self) -> None:
        """Stop polling: cancels the task, at once (a poll in flight is abandoned)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            current = asyncio.current_task()
            if task is not current:
                try:
                    await task
                except asyncio.CancelledError:
                    if current is not None and current.cancelling():
                        raise  # the caller was cancelled too: let that through

    async def _loop(self) -> None:
        while True:
            try:
                delay = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the task silently
                log.exception("poll failed unexpectedly")
                delay = self._interval
            await asyncio.sleep(delay)

    async def __aenter__(self) -> AsyncBatchSizeClient:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
