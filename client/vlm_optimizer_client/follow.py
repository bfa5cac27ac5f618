"""Follow the optimizer's batch size (``GET /batch-size``) from a VLM service.

Two faces over one state machine (:class:`_Follower`):

- :class:`BatchSizeClient` polls from a daemon thread with :mod:`http.client` (no dependency);
- :class:`AsyncBatchSizeClient` polls from an asyncio task, with :mod:`aiohttp` when it is
  installed and with :mod:`http.client` in a worker thread (:func:`asyncio.to_thread`) when it is not.

Each client object keeps one keep-alive connection for its polls (:class:`~vlm_optimizer_client._http.KeepAlive`,
or one ``aiohttp.ClientSession``), closed by ``stop()``; a connection the server closed is replaced
transparently, and a poll on one found dropped is retried once on a new one.

Both expose ``batch_size``: the last batch size the optimizer published while that answer is fresh
(younger than ``max_staleness`` seconds), else ``safe_batch_size``. Reading it does no I/O and never
blocks on the network. The optimizer being down, slow, or answering garbage never raises into the
service: every such failure is counted, polls back off exponentially (full jitter, 1 s doubling to
60 s), and one warning is logged when an outage starts and one info line when it ends.

Polls send ``If-None-Match`` with the last ``ETag``, so an unchanged decision costs a 304 and no body.

This module imports nothing of the server: only the standard library, plus :mod:`aiohttp` (lazily,
async face only) and :mod:`torch` (only if the service already imported it, in :func:`default_cleanup`).
Logs go to the standard :mod:`logging` logger ``vlm_optimizer_client``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

from vlm_optimizer_client import validate
from vlm_optimizer_client._http import IDLE_MAX_S, KeepAlive, LoopSession
from vlm_optimizer_client._follower import BACKOFF_BASE_S, BACKOFF_MAX_S, OnChange, OnCleanup, _Follower
from vlm_optimizer_client._torch import default_cleanup
from vlm_optimizer_client.decision import BadAnswer, parse_decision
from vlm_optimizer_client.identity import pod_from_env
from vlm_optimizer_client.validate import DEFAULT_URL, URL_ENV

__all__ = [
    "AsyncBatchSizeClient",
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "BadAnswer",
    "BatchSizeClient",
    "DEFAULT_URL",
    "OnChange",
    "OnCleanup",
    "URL_ENV",
    "default_cleanup",
    "parse_decision",
]

log = logging.getLogger("vlm_optimizer_client")

MAX_BODY_BYTES: Final = 1 << 20  # an answer bigger than this is not a decision
USER_AGENT: Final = "vlm-gpu-optimizer-client"

Clock = Callable[[], float]


# --------------------------------------------------------------------------- transport


def _request_headers(etag: str | None, transport: str) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": f"{USER_AGENT} ({transport})"}
    if etag:
        headers["If-None-Match"] = etag
    return headers


def _fetch_sync(http: KeepAlive, url: str, etag: str | None) -> tuple[int, dict[str, str], bytes]:
    """One GET over the object's kept connection: (status, headers, body). HTTP error statuses are
    returned, not raised.

    The connection's ``timeout`` (seconds) bounds the connection and each read. Raises :class:`OSError`
    (refused, timeouts, resets), :class:`http.client.HTTPException` or :class:`BadAnswer` (body too large).
    The user agent still says ``urllib``: the standard library's transport, as before.
    """
    status, headers, body, over = http.request("GET", url, headers=_request_headers(etag, "urllib"),
                                               limit=MAX_BODY_BYTES, idempotent=True)
    if over:
        raise BadAnswer(f"answer over {MAX_BODY_BYTES} bytes")
    return status, headers, body


def _new_session(aiohttp_mod: Any, timeout: float) -> Any:
    """One client object's session: its requests come one at a time, so its connector keeps one
    connection, idle for up to :data:`IDLE_MAX_S` (aiohttp's default is 15 s; the optimizer keeps one
    75 s). No proxy from the environment (``trust_env=False``, as before), and ``timeout`` seconds for
    each request in all. aiohttp retries an idempotent request (a poll) once when a reused connection
    turns out closed, never a POST."""
    connector = aiohttp_mod.TCPConnector(keepalive_timeout=IDLE_MAX_S)
    return aiohttp_mod.ClientSession(connector=connector, timeout=aiohttp_mod.ClientTimeout(total=timeout),
                                     trust_env=False)


def _load_aiohttp() -> Any:
    """The aiohttp module, or ``None`` when it is not installed."""
    try:
        import aiohttp
    except ImportError:
        return None
    return aiohttp


# --------------------------------------------------------------------------- the faces


class _Base:
    """The constructor, the validation and the read-only view both faces share."""

    def __init__(self, service: str, url: str | None = None, gpu: int | str | None = None, interval: float = 5.0,
                 safe_batch_size: int = 1, max_staleness: float = 60.0, timeout: float = 2.0,
                 on_change: OnChange | None = None, on_cleanup: OnCleanup | None = None,
                 clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        validate.service(service)
        validate.gpu(gpu)
        self._interval = validate.seconds("interval", interval)
        validate.integer("safe_batch_size", safe_batch_size, 1)
        self._max_staleness = validate.seconds("max_staleness", max_staleness)
        self._timeout = validate.seconds("timeout", timeout)
        base = validate.optimizer_url(url)
        self.service = service
        self.gpu = gpu
        self.base_url = base
        query = {"service": service} if gpu is None else {"service": service, "gpu": str(gpu)}
        pod = pod_from_env()
        if pod is not None:
            query["pod"] = pod
        self.url = f"{self.base_url}/batch-size?{urllib.parse.urlencode(query)}"
        self._clock = clock
        self._http = KeepAlive(self.base_url, self._timeout)  # the sync face's, and the async one's without aiohttp
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
    """Follow the optimizer from a daemon thread (the standard library; no dependency), over one
    keep-alive connection that :meth:`stop` closes.

    ``service``: the name the optimizer knows the service by. ``url``: the optimizer's read API
    (default: ``$VLM_OPTIMIZER_URL``, else ``http://127.0.0.1:8080``). ``gpu``: an index or UUID, or
    ``None`` for the optimizer's choice. ``interval``: seconds between polls while the optimizer
    answers. ``safe_batch_size``: what runs before the first answer and once the last answer is
    ``max_staleness`` seconds old. ``timeout``: seconds for the connection and each read.
    ``on_change(batch_size, decision)``: the value changed (also to and from the safe size).
    ``on_cleanup(epoch)``: the GPU's cleanup epoch rose (default: :func:`default_cleanup`).
    ``clock``: monotonic seconds (for staleness and outage durations). ``rng``: for the backoff jitter.

    Callbacks run on the polling thread. Raises :class:`~vlm_optimizer_client.validate.InvalidArgument` (a
    :class:`ValueError`) naming the argument for an invalid one (``interval``, ``max_staleness`` or ``timeout`` <= 0, ``safe_batch_size`` < 1, a
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
            status, headers, body = _fetch_sync(self._http, self.url, self._core.etag)
        except Exception as exc:  # refused, timeouts, resets, HTTPException, BadAnswer...
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
        """Stop polling and close the kept connection. Returns at once when the thread waits between
        polls; a poll in flight is waited for (bounded by ``timeout`` per socket operation)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._timeout * 3 + 1.0)
        self._http.close()

    def close(self) -> None:
        """:meth:`stop`: no more polls, no connection kept. A later :meth:`poll_once` or :meth:`start`
        opens a new one."""
        self.stop()

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
    """Follow the optimizer from an asyncio task (aiohttp if installed, else the standard library in a
    thread), over one session made at the first poll and closed by :meth:`stop` / :meth:`aclose` / the
    ``async with`` exit.

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
        self._aio = LoopSession()  # the aiohttp session, made at the first poll

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
            return await asyncio.to_thread(_fetch_sync, self._http, self.url, self._core.etag)
        session = self._session_for(aiohttp_mod)
        async with session.get(self.url, headers=_request_headers(self._core.etag, "aiohttp")) as resp:
            body = await resp.content.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES:
                resp.close()  # the rest unread: not a connection to reuse
                raise BadAnswer(f"answer over {MAX_BODY_BYTES} bytes")
            return int(resp.status), dict(resp.headers.items()), body

    @property
    def _session(self) -> Any:
        """The aiohttp session in use, if any."""
        return self._aio.session

    def _session_for(self, aiohttp_mod: Any) -> Any:
        """The object's one session (made at the first poll), on the running loop (:class:`LoopSession`)."""
        return self._aio.get(lambda: _new_session(aiohttp_mod, self._timeout))

    async def _close_session(self) -> None:
        await self._aio.close()

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
        """Stop polling: cancels the task, at once (a poll in flight is abandoned), and closes the
        session and its kept connection (a later poll makes a new one)."""
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                current = asyncio.current_task()
                if task is not current:
                    try:
                        await task
                    except asyncio.CancelledError:
                        if current is not None and current.cancelling():
                            raise  # the caller was cancelled too: let that through
        finally:
            await self._close_session()
            self._http.close()

    async def aclose(self) -> None:
        """:meth:`stop`: no more polls, no session or connection kept."""
        await self.stop()

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
