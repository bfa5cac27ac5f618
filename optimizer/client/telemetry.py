"""Measure batches and report them to the optimizer (``POST /reports``).

A :class:`Reporter` takes measurements from the service's hot path without ever blocking it or
raising: :meth:`Reporter.report` only puts the figures into a bounded buffer. A daemon thread
(:meth:`Reporter.start`) sends them, aggregated: one report per interval carries the latest batch
size, the highest peak measured at that batch size, and the latest allocator figures. An OOM is not
aggregated: it wakes the sender, goes out at once, and the reply (the service's decision, already
lowered) is handed to ``sink.apply_decision``, so the smaller batch applies before the next poll.

:class:`AsyncReporter` does the same on an asyncio task. Both drive one sans-I/O core
(:class:`_Core`), so the aggregation, retry and logging rules are written once.

:func:`measure` wraps one batch: with PyTorch and CUDA it reads the allocator's peak and figures, and
it reports an OOM (re-raising it).

PyTorch and aiohttp are optional: PyTorch is used only when the application has imported it, aiohttp
only by :class:`AsyncReporter`, which falls back to a thread around urllib without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import inspect
import json
import logging
import math
import operator
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuid_module
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, replace
from types import ModuleType, TracebackType
from typing import Any, Protocol, TypeVar, cast

from optimizer.client.identity import pod_from_env
from optimizer.client.oom import is_cpu_device, is_oom_error, loaded_torch

log = logging.getLogger("optimizer.client")

URL_ENV = "VLM_OPTIMIZER_URL"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MAX_PENDING = 1024
MAX_REPLY_BYTES = 1 << 20
USER_AGENT = "vlm-gpu-optimizer-client"
# The optimizer is a neighbour (a cluster Service, localhost): no proxy from the environment, as aiohttp by
# default and as optimizer.client.follow.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

F = TypeVar("F", bound=Callable[..., Any])


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


def gpu_identity() -> str | None:
    """The UUID (``GPU-…``) of PyTorch's current CUDA device, or ``None``.

    ``None`` without PyTorch loaded, without CUDA, before CUDA is initialised (reading it would
    initialise CUDA), or with a PyTorch that does not expose ``get_device_properties(i).uuid``. A
    CUDA index is not used instead: under ``CUDA_VISIBLE_DEVICES`` it is not the optimizer's index.
    """
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not cuda.is_available() or not cuda.is_initialized():
            return None
        uuid = getattr(cuda.get_device_properties(cuda.current_device()), "uuid", None)
    except Exception as exc:
        log.debug("no GPU identity from torch: %s", exc)
        return None
    if uuid is None:
        return None
    raw = getattr(uuid, "bytes", None)  # PyTorch 2.4 printed these raw bytes; .bytes is reliable
    try:
        text = str(uuid_module.UUID(bytes=raw)) if isinstance(raw, bytes) and len(raw) == 16 else str(uuid)
    except Exception:
        return None
    if not text:
        return None
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _count(value: Any, name: str, lo: int) -> int | None:
    if value is None:
        return None
    # a bool, or a bool tensor (PyTorch's __index__ turns torch.tensor(True) into 1): not a count
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool":
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    try:
        n = operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}") from None
    if n < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {n}")
    return n


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
        if not isinstance(service, str) or not service:
            raise ValueError("service must be a non-empty string")
        base = (url if url is not None else os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an http(s) URL of the optimizer, got {base!r}")
        for name, v in (("interval", interval), ("timeout", timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, (int, str))):
            raise ValueError(f"gpu must be an index, a UUID or None, got {gpu!r}")
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
                raise ValueError("batch_size is required")
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
        """POST one report with urllib (blocks up to ``timeout``); never raises."""
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              "User-Agent": USER_AGENT})
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                return _Reply(resp.status, _parse(resp.read(MAX_REPLY_BYTES)))
        except urllib.error.HTTPError as exc:
            with exc:
                return _Reply(exc.code, _parse(exc.read(MAX_REPLY_BYTES)))
        except urllib.error.URLError as exc:
            return _Failure(f"{type(exc.reason).__name__}: {exc.reason}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return _Failure(f"{type(exc).__name__}: {exc}")


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


class Reporter(_CoreView):
    """Reports a service's batches to the optimizer from a daemon thread (or by :meth:`flush`).

    ``url``: the optimizer's read API (default ``$VLM_OPTIMIZER_URL``, else ``http://127.0.0.1:8080``).
    ``gpu``: an index or UUID; ``None`` finds the UUID of PyTorch's current device at the first report
    (:func:`gpu_identity`), else lets the optimizer choose. ``interval``: seconds between aggregated
    reports. ``timeout``: seconds per HTTP request. ``sink``: gets each reply's decision.
    ``max_pending``: the buffer's bound. Raises :class:`ValueError` for arguments out of range; after
    that, nothing it does raises.
    """

    def __init__(self, service: str, url: str | None = None, gpu: int | str | None = None, interval: float = 5.0,
                 timeout: float = 2.0, sink: DecisionSink | None = None, *,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._core = _Core(service, url, gpu, interval, timeout, sink, max_pending)
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def report(self, batch_size: int, peak_bytes: int | None = None, allocated_bytes: int | None = None,
               reserved_bytes: int | None = None, inactive_split_bytes: int | None = None, oom: bool = False) -> None:
        """Take one batch's figures (bytes) without blocking; an OOM wakes the sender. Never raises."""
        try:
            if self._core.add(batch_size, peak_bytes, allocated_bytes, reserved_bytes, inactive_split_bytes, oom):
                self._wake.set()
        except Exception:  # the hot path of a service: nothing here may break it
            log.exception("telemetry report failed")

    def flush(self) -> None:
        """Send what is pending now and wait for it (and for a send in progress). Never raises."""
        self._send(urgent_only=False)

    def _send(self, urgent_only: bool) -> None:
        with self._send_lock:
            try:
                _drive(self._core.cycle(urgent_only), self._core.post)
            except Exception:
                log.exception("telemetry send failed")

    def start(self) -> Reporter:
        """Send in the background: every ``interval``, and at once after an OOM. Idempotent."""
        if self.running:
            return self
        self._stopping = False
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name=f"optimizer-reporter-{self.service}", daemon=True)
        self._thread.start()
        if self._core.has_urgent():  # an OOM reported before the start goes out now
            self._wake.set()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after a last flush; waits at most ``timeout`` seconds (default: twice the
        request timeout plus one second; a flush stops at its first failed send). Never raises."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        if thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self._core.timeout * 2 + 1.0)
        if not thread.is_alive():
            self._thread = None

    def _run(self) -> None:
        next_at = time.monotonic() + self._core.interval
        while True:
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            self._wake.clear()
            if self._stopping:
                self._send(urgent_only=False)
                return
            if time.monotonic() >= next_at:
                self._send(urgent_only=False)
                next_at = time.monotonic() + self._core.interval
            else:
                self._send(urgent_only=True)

    def __enter__(self) -> Reporter:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _load_aiohttp() -> ModuleType | None:
    try:
        import aiohttp
    except ImportError:
        return None
    return aiohttp


class AsyncReporter(_CoreView):
    """:class:`Reporter` for asyncio services: the same arguments and behaviour, sending from a task.

    HTTP goes through aiohttp when it is installed, else through urllib in a worker thread.
    :meth:`report` stays a plain method: call it from the event loop or from any thread.
    """

    def __init__(self, service: str, url: str | None = None, gpu: int | str | None = None, interval: float = 5.0,
                 timeout: float = 2.0, sink: DecisionSink | None = None, *,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._core = _Core(service, url, gpu, interval, timeout, sink, max_pending)
        self._send_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def report(self, batch_size: int, peak_bytes: int | None = None, allocated_bytes: int | None = None,
               reserved_bytes: int | None = None, inactive_split_bytes: int | None = None, oom: bool = False) -> None:
        """Take one batch's figures (bytes) without blocking; an OOM wakes the sender. Never raises."""
        try:
            if self._core.add(batch_size, peak_bytes, allocated_bytes, reserved_bytes, inactive_split_bytes, oom):
                self._notify()
        except Exception:
            log.exception("telemetry report failed")

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or not self.running:
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is closed
            pass

    async def flush(self) -> None:
        """Send what is pending now and wait for it (and for a send in progress). Never raises."""
        await self._send(urgent_only=False)

    async def _send(self, urgent_only: bool) -> None:
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        async with self._send_lock:
            try:
                await self._cycle(self._core.cycle(urgent_only))
            except Exception:
                log.exception("telemetry send failed")

    async def _cycle(self, cycle: _Cycle) -> None:
        aiohttp = _load_aiohttp()
        if aiohttp is None:
            await _drive_async(cycle, lambda body: asyncio.to_thread(self._core.post, body))
            return
        timeout = aiohttp.ClientTimeout(total=self._core.timeout)
        async with contextlib.AsyncExitStack() as stack:
            session: Any = None

            async def post(body: dict[str, Any]) -> _Outcome:
                nonlocal session
                try:
                    if session is None:  # opened only when there is something to send
                        session = await stack.enter_async_context(
                            aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT}, trust_env=False))
                    async with session.post(self._core.endpoint, json=body) as resp:
                        return _Reply(resp.status, _parse(await resp.read()))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    return _Failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

            await _drive_async(cycle, post)

    async def start(self) -> AsyncReporter:
        """Send from a task of the running loop: every ``interval``, and at once after an OOM. Idempotent."""
        if self.running:
            return self
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"optimizer-reporter-{self.service}")
        if self._core.has_urgent():
            self._wake.set()
        return self

    async def stop(self) -> None:
        """Stop the task after a last flush. Never raises (unless cancelled)."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        try:
            await task
        except Exception:
            log.exception("the telemetry task failed")
        finally:
            self._task = None

    async def _run(self) -> None:
        loop, wake = asyncio.get_running_loop(), self._wake
        assert wake is not None
        next_at = loop.time() + self._core.interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, next_at - loop.time()))
            wake.clear()
            if self._stopping:
                await self._send(urgent_only=False)
                return
            if loop.time() >= next_at:
                await self._send(urgent_only=False)
                next_at = loop.time() + self._core.interval
            else:
                await self._send(urgent_only=True)

    async def __aenter__(self) -> AsyncReporter:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class ReportTarget(Protocol):
    """What :func:`measure` reports to: a :class:`Reporter` or an :class:`AsyncReporter`."""

    def report(self, batch_size: int, peak_bytes: int | None = ..., allocated_bytes: int | None = ...,
               reserved_bytes: int | None = ..., inactive_split_bytes: int | None = ..., oom: bool = ...) -> None: ...


def _cuda_of(device: Any) -> Any:
    """``torch.cuda`` when PyTorch is loaded, CUDA is available and ``device`` is not the CPU, else None."""
    if is_cpu_device(device):
        return None
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:
        return None


class measure:
    """Measure one batch and report it: a context manager, and a decorator.

    ``with measure(reporter, batch_size=8):`` runs the block; with PyTorch and CUDA it first resets the
    allocator's peak (``torch.cuda.reset_peak_memory_stats(device)``) and afterwards reports
    ``max_memory_allocated`` as the peak, with ``memory_allocated``, ``memory_reserved`` and the
    ``inactive_split_bytes.all.current`` allocator statistic; without them, the batch size alone.
    A block that runs out of memory (:func:`is_oom_error`) is reported with ``oom=True`` and its
    error re-raised; a block that fails otherwise is not reported. Nothing is reported for a CPU
    ``device``. Reading the figures never raises.

    As a decorator (sync or async functions), ``batch_size`` and ``device`` left ``None`` are read from
    each call's arguments of those names. Stacked under :func:`optimizer.client.oom.recover_oom`, give the
    reporter to one of the two, or each OOM is reported twice.
    """

    def __init__(self, reporter: ReportTarget, batch_size: int | None = None, device: Any = None) -> None:
        self.reporter = reporter
        self.batch_size = batch_size
        self.device = device
        self._cuda: Any = None

    def __enter__(self) -> measure:
        if self.batch_size is None:
            raise ValueError("measure() needs a batch_size to report")
        self._cuda = _cuda_of(self.device)
        if self._cuda is not None:
            try:
                self._cuda.reset_peak_memory_stats(self.device)
            except Exception as exc:
                log.debug("reset_peak_memory_stats failed: %s", exc)
                self._cuda = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        cuda, self._cuda = self._cuda, None
        batch = cast(int, self.batch_size)
        if is_cpu_device(self.device):
            return
        if exc is None:
            f = self._figures(cuda, peak=True)
        elif is_oom_error(exc):
            f = self._figures(cuda, peak=False)
        else:
            return
        self.reporter.report(batch, f.get("peak_bytes"), f.get("allocated_bytes"), f.get("reserved_bytes"),
                             f.get("inactive_split_bytes"), oom=exc is not None)

    def _figures(self, cuda: Any, *, peak: bool) -> dict[str, int | None]:
        if cuda is None:
            return {}
        d = self.device
        out: dict[str, int | None] = {}
        readers: list[tuple[str, Callable[[], Any]]] = [
            ("allocated_bytes", lambda: cuda.memory_allocated(d)),
            ("reserved_bytes", lambda: cuda.memory_reserved(d)),
            ("inactive_split_bytes", lambda: cuda.memory_stats(d).get("inactive_split_bytes.all.current")),
        ]
        if peak:
            readers.insert(0, ("peak_bytes", lambda: cuda.max_memory_allocated(d)))
        for key, read in readers:
            try:
                value = read()
                out[key] = None if value is None else int(value)
            except Exception as exc:
                log.debug("reading %s failed: %s", key, exc)
        return out

    def __call__(self, fn: F) -> F:
        sig = inspect.signature(fn)
        if self.batch_size is None and "batch_size" not in sig.parameters:
            raise TypeError(f"@measure needs a batch_size, or a batch_size parameter on {fn.__qualname__}")

        def for_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> measure:
            batch, device = self.batch_size, self.device
            if batch is None or (device is None and "device" in sig.parameters):
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                batch = batch if batch is not None else bound.arguments.get("batch_size")
                device = device if device is not None else bound.arguments.get("device")
            return measure(self.reporter, batch, device)

        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with for_call(args, kwargs):
                    return await async_fn(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with for_call(args, kwargs):
                return fn(*args, **kwargs)

        return cast(F, wrapper)


__all__ = ["DEFAULT_URL", "URL_ENV", "AsyncReporter", "DecisionSink", "Measurement", "ReportTarget", "Reporter",
           "ReporterStats", "gpu_identity", "measure"]
