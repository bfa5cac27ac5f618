"""Run one blocking client call in its own named thread, without stalling the event loop.

The official client is synchronous (urllib3). Each call runs in a dedicated daemon thread whose
result (or exception) comes back to the loop through ``call_soon_threadsafe``. Cancelling the
awaiting task calls ``interrupt`` (for a watch: shut the socket down, so the blocked read returns
at once) and then waits, at most ``grace`` seconds, for the thread to finish before the
``CancelledError`` goes on (further cancellations meanwhile do not cut that wait short): when the
caller has been cancelled, its thread is done too (or is reported stuck). Threads are named
``kube-<what>`` so that tests can check that none is left.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
_JOIN_S = 1.0  # a thread that has handed its result over ends at once; this only guards against surprises
log = structlog.get_logger("optimizer.kube")


def grace_for(request_timeout: float) -> float:
    """How long a cancelled call's thread is waited for: its own timeout, and a second for the rest (s)."""
    return request_timeout + 1.0


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def post(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Schedule ``callback`` on ``loop`` from any thread; False when the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        return False
    return True


async def run_blocking(fn: Callable[[], T], *, name: str, grace: float,
                       interrupt: Callable[[], None] | None = None) -> T:
    """``fn()`` in a new daemon thread called ``name``; its result, or what it raised.

    Raises whatever ``fn`` raises, or ``CancelledError`` when cancelled (after ``interrupt`` and at
    most ``grace`` seconds waiting for the thread; a thread still running then is logged as
    ``kube_thread_stuck`` and left to finish on its own).
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(value: T | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)  # type: ignore[arg-type]

    def body() -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the loop, raised there
            post(loop, functools.partial(deliver, None, e))  # bound now: ``e`` is unset after except
        else:
            post(loop, functools.partial(deliver, value, None))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    try:
        result = await asyncio.shield(fut)
    except asyncio.CancelledError:
        if interrupt is not None:
            interrupt()
        deadline = loop.time() + grace
        while not fut.done() and loop.time() < deadline:
            try:
                await asyncio.wait({fut}, timeout=deadline - loop.time())
            except asyncio.CancelledError:
                pass  # cancelled again: we are already on our way out, still let the thread finish
        if not fut.done():
            log.warning("kube_thread_stuck", thread=name, waited_s=grace)
            fut.add_done_callback(_retrieve)  # whatever it ends with, nobody waits for it any more
        else:
            if not fut.cancelled():
                fut.exception()  # retrieved: the caller was cancelled, nobody else will look at it
            thread.join(_JOIN_S)
        raise
    except BaseException:
        thread.join(_JOIN_S)
        raise
    thread.join(_JOIN_S)  # it has handed its result over; only its return is left
    return result


class Stream:
    """The watch response a thread is reading; ``stop()`` (any thread) makes the read return."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resp: Any = None
        self.stopped = False

    def attach(self, resp: Any) -> bool:
        with self._lock:
            self._resp = resp
            return not self.stopped

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            resp = self._resp
        conn = getattr(resp, "connection", None)  # urllib3's HTTPConnection, while the body is read
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # as Watch.stop() does: the blocked recv returns now
            except OSError:
                pass
