"""Supervised background tasks: started, named, watched and stopped in one place.

The read API's application runs a few eternal tasks (the sampler, the persister, Kubernetes
discovery with its publisher). Each is meant to run until cancelled; one that raises, or returns,
has died. :class:`Supervisor` logs the death at once with its traceback (``task_failed``, or
``task_exited`` for a return), counts it, and restarts the task after a capped exponential
back-off (no jitter: one process restarts its own tasks, there is no herd to spread). A task that
died :attr:`Policy.fail_after` times within :attr:`Policy.window` seconds is *failing*: ``/health``
answers 503 naming it, so Kubernetes restarts a process that cannot keep the task alive. It keeps
being restarted meanwhile, and stops failing once a window passes without a death.

Stopping cancels the task and waits up to its ``stop_timeout`` seconds; one still running then is
logged (``task_stuck_on_shutdown``) and left behind, so shutdown goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)

Run = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Policy:
    """How a task is restarted: after ``backoff_initial`` seconds, doubling per consecutive death up to
    ``backoff_max``; ``fail_after`` deaths within ``window`` seconds make it failing (``/health`` 503).
    ``stop_timeout``: how long a stop waits for it (``None``: the supervisor's)."""

    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    fail_after: int = 5
    window: float = 600.0
    stop_timeout: float | None = None

    def backoff(self, consecutive: int) -> float:
        """The wait before the restart that follows the ``consecutive``-th death in a row (1, 2, ...)."""
        return float(min(self.backoff_max, self.backoff_initial * 2 ** max(0, consecutive - 1)))


@dataclass
class TaskState:
    """What the supervisor knows of one task (read by ``/health`` and the metrics)."""

    name: str
    policy: Policy
    failures: int = 0  # deaths so far
    restarts: int = 0  # restarts so far
    consecutive: int = 0  # deaths since the task last ran for longer than backoff_max
    last_error: str | None = None
    last_failed_at: float | None = None
    recent: deque[float] = field(default_factory=deque)  # times of the deaths within the window
    task: asyncio.Task[None] | None = None
    stopping: bool = False  # stop() was called: an end now is no death

    def failing(self, now: float) -> bool:
        """Whether it died ``fail_after`` times within the last ``window`` seconds."""
        while self.recent and now - self.recent[0] > self.policy.window:
            self.recent.popleft()
        return len(self.recent) >= self.policy.fail_after

    def to_dict(self) -> dict[str, Any]:
        return {"failures_in_window": len(self.recent), "window_s": self.policy.window,
                "fail_after": self.policy.fail_after, "failures": self.failures, "restarts": self.restarts,
                "last_error": self.last_error, "last_failed_at": self.last_failed_at}


class Supervisor:
    """Runs named eternal tasks, restarting the ones that die.

    ``clock`` (seconds) dates the deaths; ``sleep`` is what the back-off waits with (both injectable
    so tests need no real time).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, stop_timeout: float = 5.0) -> None:
        self.clock = clock
        self.sleep = sleep
        self.stop_timeout = stop_timeout
        self.tasks: dict[str, TaskState] = {}

    def start(self, name: str, run: Run, policy: Policy = Policy()) -> TaskState:
        """Start ``run()`` as the task ``name`` (one task per name at a time: ``ValueError`` otherwise)."""
        st = self.tasks.get(name)
        if st is not None and st.task is not None and not st.task.done():
            raise ValueError(f"task {name!r} is already running")
        st = self.tasks[name] = TaskState(name, policy)
        st.task = asyncio.create_task(self._guard(st, run), name=name)
        return st

    async def _guard(self, st: TaskState, run: Run) -> None:
        while True:
            started = self.clock()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead task is reported and restarted, never lost
                error = repr(exc)
                log.exception("task_failed", task=st.name, error=error, stopping=st.stopping)
                if st.stopping:
                    return
            else:
                if st.stopping:
                    return
                error = "returned"
                log.error("task_exited", task=st.name, detail="an eternal task returned")
            now = self.clock()
            if now - started > st.policy.backoff_max:
                st.consecutive = 0  # it ran well for a while: back-off starts over
            st.consecutive += 1
            st.failures += 1
            st.last_error, st.last_failed_at = error, now
            st.recent.append(now)
            delay = st.policy.backoff(st.consecutive)
            log.warning("task_restarting", task=st.name, in_s=delay, failures=st.failures,
                        failing=st.failing(now))
            await self.sleep(delay)
            st.restarts += 1

    def failing(self) -> dict[str, TaskState]:
        """The tasks that died too often lately, by name."""
        now = self.clock()
        return {name: st for name, st in self.tasks.items() if st.failing(now)}

    async def stop(self, name: str) -> bool:
        """Cancel the task ``name`` and wait for it; ``False`` (logged) when it was still running after
        its policy's ``stop_timeout`` (or the supervisor's) seconds. Unknown or finished tasks: ``True``."""
        st = self.tasks.get(name)
        task = st.task if st is not None else None
        if st is None or task is None or task.done():
            return True
        st.stopping = True
        task.cancel()
        timeout = st.policy.stop_timeout if st.policy.stop_timeout is not None else self.stop_timeout
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.error("task_stuck_on_shutdown", task=name, timeout_s=timeout,
                      detail="it did not end when cancelled; shutdown goes on without it")
            return False
        return True

    async def stop_all(self) -> list[str]:
        """Stop every task, the last started first; the names of the ones stuck."""
        stuck = []
        for name in reversed(list(self.tasks)):
            if not await self.stop(name):
                stuck.append(name)
        return stuck
