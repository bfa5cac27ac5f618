"""At most N pieces of work of each kind at once (``{"extraction": 4, "classification": 1}``), queued first
come, first served, for coroutines and threads alike: :class:`ConcurrencyLimits`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import types
from collections.abc import Mapping

from vlm_optimizer_client import validate

__all__ = ["ConcurrencyLimits"]

log = logging.getLogger("vlm_optimizer_client")


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled waiter's future is done already
        future.set_result(None)


class _Waiter:
    """One queued acquirer: a coroutine (future on its loop) or a thread (event)."""

    __slots__ = ("future", "loop", "event", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] | None = loop.create_future() if loop is not None else None
        self.event = threading.Event() if loop is None else None
        self.granted = False

    def grant(self) -> bool:
        """Hand the slot over (caller holds the lock); False when the waiter cannot be woken."""
        self.granted = True
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        try:
            self.loop.call_soon_threadsafe(_wake, self.future)
        except RuntimeError:  # its loop is closed: nobody will take the slot
            self.granted = False
            return False
        return True


class _Slot:
    """The bookkeeping of one kind: limit, holders, FIFO of waiters; a thread lock guards it."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.in_use = 0
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.lock = threading.Lock()

    def try_take(self) -> bool:
        # Caller holds the lock. Queued waiters go first (FIFO).
        if self.in_use < self.limit and not self.waiters:
            self.in_use += 1
            return True
        return False

    def release(self) -> None:
        with self.lock:
            while self.waiters:
                if self.waiters.popleft().grant():
                    return  # handed over: in_use unchanged
            if self.in_use <= 0:
                raise RuntimeError(f"{self.kind}: released more than acquired")
            self.in_use -= 1

    def abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled, timed out, interrupted): pass its slot on, or leave the queue."""
        with self.lock:
            if not waiter.granted:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
                return
        self.release()

    async def acquire(self) -> None:
        with self.lock:
            if self.try_take():
                return
            waiter = _Waiter(asyncio.get_running_loop())
            self.waiters.append(waiter)
        assert waiter.future is not None
        try:
            await waiter.future
        except BaseException:
            self.abandon(waiter)
            raise

    def acquire_sync(self, timeout: float | None) -> None:
        with self.lock:
            if self.try_take():
                return
            if timeout is not None and timeout <= 0:
                raise TimeoutError(f"{self.kind}: all {self.limit} slots in use")
            waiter = _Waiter(None)
            self.waiters.append(waiter)
        assert waiter.event is not None
        try:
            woken = waiter.event.wait(timeout)
        except BaseException:
            self.abandon(waiter)
            raise
        if not woken:
            with self.lock:
                if waiter.granted:  # granted just after the wait ran out: keep it
                    return
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise TimeoutError(f"{self.kind}: no slot free within {timeout} s (limit {self.limit})")


class _AsyncHold:
    def __init__(self, slot: _Slot) -> None:
        self._slot = slot

    async def __aenter__(self) -> None:
        await self._slot.acquire()
        log.debug("%s started (concurrent: %d/%d)", self._slot.kind, self._slot.in_use, self._slot.limit)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: types.TracebackType | None) -> None:
        self._slot.release()


class _SyncHold:
    def __init__(self, slot: _Slot, timeout: float | None) -> None:
        self._slot = slot
        self._timeout = timeout

    def __enter__(self) -> None:
        self._slot.acquire_sync(self._timeout)
        log.debug("%s started (concurrent: %d/%d)", self._slot.kind, self._slot.in_use, self._slot.limit)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self._slot.release()


class ConcurrencyLimits:
    """At most ``limits[kind]`` pieces of work of each kind at once, queued first come, first served.

    ``async with limits.acquire("classification"):`` in coroutines, ``with
    limits.acquire_sync("classification"):`` in threads; both draw on the same slots, so a limit
    holds across an event loop and a thread pool together. The object is bound to no event loop: it
    can be created at import time and used from several loops and threads (do not call
    :meth:`acquire_sync` from an event loop's thread: it blocks the loop).

    A waiting coroutine that is cancelled leaves the queue, or passes on a slot handed to it.
    """

    def __init__(self, limits: Mapping[str, int]) -> None:
        """
        Raises:
            ValueError: a limit that is not a positive int (the message names the kind), or no kinds.
        """
        if not limits:
            validate.fail("limits", "at least one kind of work", limits)
        self._slots: dict[str, _Slot] = {}
        for kind, limit in limits.items():
            validate.integer(f"limits[{kind!r}]", limit, 1)
            self._slots[kind] = _Slot(kind, limit)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The known kinds, in declaration order."""
        return tuple(self._slots)

    def _slot(self, kind: str) -> _Slot:
        try:
            return self._slots[kind]
        except KeyError:
            raise KeyError(f"unknown kind of work {kind!r}; known: {', '.join(sorted(self._slots))}") from None

    def acquire(self, kind: str) -> contextlib.AbstractAsyncContextManager[None]:
        """An async context manager holding one ``kind`` slot. Raises KeyError for an unknown kind
        (here, before entering)."""
        return _AsyncHold(self._slot(kind))

    def acquire_sync(self, kind: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """A context manager holding one ``kind`` slot from a thread.

        Raises:
            KeyError: unknown kind (here, before entering).
            TimeoutError: on entering, no slot came free within ``timeout`` seconds (0: do not wait).
        """
        return _SyncHold(self._slot(kind), timeout)

    def limit(self, kind: str) -> int:
        """The limit of ``kind``. Raises KeyError for an unknown kind."""
        return self._slot(kind).limit

    def in_use(self, kind: str) -> int:
        """Slots of ``kind`` held now (including one handed to a waiter about to resume)."""
        return self._slot(kind).in_use

    def waiting(self, kind: str) -> int:
        """Acquirers of ``kind`` queued now."""
        return len(self._slot(kind).waiters)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{kind: {"limit", "in_use", "waiting"}}`` for status pages and logs."""
        out: dict[str, dict[str, int]] = {}
        for kind, slot in self._slots.items():
            with slot.lock:
                out[kind] = {"limit": slot.limit, "in_use": slot.in_use, "waiting": len(slot.waiters)}
        return out
