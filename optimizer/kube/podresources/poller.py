"""Polls the kubelet's pod-resources socket and hands each pod's GPU device IDs to discovery.

Every ``pod_resources_interval`` seconds, one ``List`` (grpcio's synchronous stub, in a worker thread
named ``kube-podresources``, with a deadline of ``min(request_timeout, interval)``), so a slow or
stuck kubelet never stalls the event loop. While the socket is absent (not mounted, kubelet down),
unreachable, slow or answers garbage, the mapping is empty and the pods' annotations and their own
polls decide, as without the socket; each change of state is logged once, not every poll.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from optimizer.kube._threads import grace_for, run_blocking
from optimizer.kube.podresources.client import Listing, PodResourcesClient, PodResourcesError

log = structlog.get_logger("optimizer.kube")


class Lister(Protocol):
    def list(self) -> Listing: ...


@dataclass
class PollerStats:
    state: str = "starting"  # ok, absent (no socket), failing (the last List failed)
    last_ok_at: float | None = None
    last_error: str | None = None
    errors_total: dict[str, int] = field(default_factory=dict)  # by reason
    pods: int = 0  # pods with GPU devices in the last answer
    ignored_resources: tuple[str, ...] = ()
    bad_device_ids: int = 0


class PodResourcesPoller:
    """``on_change(devices)`` whenever the kubelet's mapping changes (``{}``: none known)."""

    def __init__(self, socket_path: str, *, interval: float, timeout: float,
                 on_change: Callable[[Mapping[str, tuple[str, ...]]], None], clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, client: Lister | None = None) -> None:
        self.socket_path = socket_path
        self.interval = interval
        self.timeout = min(timeout, interval)
        self.on_change = on_change
        self.clock = clock
        self.sleep = sleep
        self.client: Lister = client or PodResourcesClient(socket_path, self.timeout)
        self.stats = PollerStats()
        self.polls = 0  # List attempts completed (or skipped: no socket), for tests and tools
        self._last: Mapping[str, tuple[str, ...]] | None = None
        self._reason: str | None = None  # of the last failure
        self._round = asyncio.Condition()

    def _socket_present(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except OSError:
            return False

    def _publish(self, devices: Mapping[str, tuple[str, ...]]) -> None:
        if self._last is not None and dict(self._last) == dict(devices):
            return
        self._last = devices
        self.on_change(devices)

    def _fail(self, state: str, reason: str, message: str) -> None:
        self.stats.errors_total[reason] = self.stats.errors_total.get(reason, 0) + 1
        if self.stats.state != state or self._reason != reason:  # once per change, not every poll
            event = "pod_resources_absent" if state == "absent" else "pod_resources_failed"
            (log.info if state == "absent" else log.warning)(
                event, socket=self.socket_path, reason=reason, detail=message,
                fallback="pod annotations and the pods' own polls decide their GPUs")
        self.stats.state, self.stats.last_error, self._reason = state, message, reason
        self.stats.pods = 0
        self._publish({})

    async def poll_once(self) -> None:
        """One ``List``; never raises but ``CancelledError``."""
        try:
            if not self._socket_present():
                self._fail("absent", "absent", f"no unix socket at {self.socket_path}")
                return
            listing = await asyncio.wait_for(
                run_blocking(self.client.list, name="kube-podresources", grace=grace_for(self.timeout)),
                timeout=self.timeout + 1.0)  # grpc's own deadline ends the call first; this is a guard
        except asyncio.CancelledError:
            raise
        except PodResourcesError as e:
            self._fail("failing", e.reason, str(e))
        except (TimeoutError, asyncio.TimeoutError):
            self._fail("failing", "timeout", f"pod-resources List on {self.socket_path}: no answer in "
                       f"{self.timeout + 1.0:g} s")
        except Exception as e:  # noqa: BLE001 - an unreadable answer must not end discovery
            self._fail("failing", "bad_answer", f"pod-resources List on {self.socket_path}: {type(e).__name__}: "
                       f"{str(e)[:200]}")
        else:
            if self.stats.state != "ok":
                log.info("pod_resources_ok", socket=self.socket_path, pods=len(listing.devices))
            self.stats.state, self.stats.last_error, self._reason = "ok", None, None
            self.stats.last_ok_at = self.clock()
            self.stats.pods = len(listing.devices)
            self.stats.ignored_resources = listing.ignored_resources
            self.stats.bad_device_ids = listing.bad_device_ids
            self._publish(listing.devices)
        finally:
            async with self._round:
                self.polls += 1
                self._round.notify_all()

    async def wait_polls(self, n: int) -> None:
        """Until ``n`` polls have completed (for tests and tools; no timeout of its own)."""
        async with self._round:
            await self._round.wait_for(lambda: self.polls >= n)

    async def run(self) -> None:
        log.info("pod_resources_started", socket=self.socket_path, interval_s=self.interval, timeout_s=self.timeout)
        while True:
            await self.poll_once()
            await self.sleep(self.interval)

    def status(self) -> dict[str, Any]:
        st = self.stats
        return {"socket": self.socket_path, "state": st.state, "last_ok_at": st.last_ok_at,
                "last_error": st.last_error, "pods": st.pods, "errors": dict(st.errors_total),
                "ignored_resources": list(st.ignored_resources), "bad_device_ids": st.bad_device_ids}
