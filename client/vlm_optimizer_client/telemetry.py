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
only by :class:`AsyncReporter`, which falls back to the standard library in a thread without it.

Each reporter keeps one keep-alive connection for its reports (:class:`~vlm_optimizer_client._http.KeepAlive`,
or one ``aiohttp.ClientSession``), closed by ``stop()``. A report is sent again on a new connection at
once only when the kept one failed while sending it; otherwise a failed send waits for the next cycle,
as before (see :mod:`vlm_optimizer_client._http` for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from types import ModuleType, TracebackType
from typing import Any

from vlm_optimizer_client._reporting import (DEFAULT_MAX_PENDING, USER_AGENT, DecisionSink, Measurement, ReporterStats,
                                             _Core, _CoreView, _Cycle, _drive, _drive_async, _Failure, _Outcome,
                                             _parse, _Reply)
from vlm_optimizer_client._http import IDLE_MAX_S, LoopSession
from vlm_optimizer_client._torch import gpu_identity
from vlm_optimizer_client.measuring import ReportTarget, measure
from vlm_optimizer_client.validate import DEFAULT_URL, URL_ENV

log = logging.getLogger("vlm_optimizer_client")


class Reporter(_CoreView):
    """Reports a service's batches to the optimizer from a daemon thread (or by :meth:`flush`).

    ``url``: the optimizer's read API (default ``$VLM_OPTIMIZER_URL``, else ``http://127.0.0.1:8080``).
    ``gpu``: an index or UUID; ``None`` finds the UUID of PyTorch's current device at the first report
    (:func:`gpu_identity`), else lets the optimizer choose. ``interval``: seconds between aggregated
    reports. ``timeout``: seconds per HTTP request. ``sink``: gets each reply's decision.
    ``max_pending``: the buffer's bound. Raises :class:`~vlm_optimizer_client.validate.InvalidArgument` for arguments out of
    range; after that, nothing it does raises.
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
            self._core.http.close()
            return
        self._stopping = True
        self._wake.set()
        if thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self._core.timeout * 2 + 1.0)
        if not thread.is_alive():
            self._thread = None
            self._core.http.close()  # after the last flush; a later flush() opens a new connection

    def close(self) -> None:
        """:meth:`stop` (its last flush included), then no connection kept. Never raises."""
        self.stop()

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

    HTTP goes through aiohttp when it is installed, else through the standard library (one kept connection) in a worker thread.
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
        self._aio = LoopSession()  # the aiohttp session, made at the first send

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

        async def post(body: dict[str, Any]) -> _Outcome:
            try:
                session = self._session_for(aiohttp)  # made only when there is something to send
                async with session.post(self._core.endpoint, json=body) as resp:
                    return _Reply(resp.status, _parse(await resp.read()))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                return _Failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

        await _drive_async(cycle, post)

    @property
    def _session(self) -> Any:
        """The aiohttp session in use, if any."""
        return self._aio.session

    def _session_for(self, aiohttp: ModuleType) -> Any:
        """The reporter's one session, on the running loop (:class:`LoopSession`): one connection kept
        while idle up to IDLE_MAX_S (aiohttp's default: 15 s; the optimizer: 75 s); aiohttp never retries
        a POST on a reused connection that turns out closed."""
        return self._aio.get(lambda: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(keepalive_timeout=IDLE_MAX_S),
            timeout=aiohttp.ClientTimeout(total=self._core.timeout), headers={"User-Agent": USER_AGENT},
            trust_env=False))

    async def _close_session(self) -> None:
        await self._aio.close()

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
            await self._close_transports()
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
            await self._close_transports()  # after the last flush; a later flush() makes a new session

    async def aclose(self) -> None:
        """:meth:`stop` (its last flush included), then no session or connection kept."""
        await self.stop()

    async def _close_transports(self) -> None:
        try:
            await self._close_session()
        except Exception:
            log.exception("closing the telemetry session failed")
        self._core.http.close()

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


__all__ = ["DEFAULT_URL", "URL_ENV", "AsyncReporter", "DecisionSink", "Measurement", "ReportTarget", "Reporter",
           "ReporterStats", "gpu_identity", "measure"]
