"""What a service is told: the :class:`Decision` value, and how one is made from the policy's state.

A plain value: how it is written on the wire (JSON, ETag) is the API layer's (``optimizer/api/decisions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from optimizer.config import Settings
from optimizer.gpu.types import GpuSample
from optimizer.policy.types import GpuState, Pressure, ServiceState


@dataclass(frozen=True, slots=True)
class Decision:
    """What a service is told (``GET /batch-size`` and the reply to ``POST /reports``)."""

    service: str
    batch_size: int
    optimal_batch_size: int
    strategy: str
    pressure: str
    cleanup_epoch: int
    reason: str
    updated_at: float
    gpu_index: int | None
    gpu_uuid: str | None
    gpu_name: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    registered: bool = True  # False: an unknown name, answered without taking a share (docs/api.md)


def on_gpu(service: str, batch: int, optimal: int, strategy: str, reason: str, updated_at: float, index: int,
           gs: GpuState | None, sample: GpuSample | None, registered: bool = True) -> Decision:
    """A decision for ``service`` on GPU ``index``: its GPU's pressure and epoch (``gs``) and figures (``sample``)."""
    return Decision(
        service=service,
        batch_size=batch,
        optimal_batch_size=optimal,
        strategy=strategy,
        pressure=(gs.pressure if gs else Pressure.NORMAL).value,
        cleanup_epoch=gs.cleanup_epoch if gs else 0,
        reason=reason,
        updated_at=updated_at,
        gpu_index=index,
        gpu_uuid=sample.uuid if sample else (gs.uuid if gs else None),
        gpu_name=sample.name if sample else (gs.name if gs else None),
        memory_used_bytes=sample.memory_used_bytes if sample else None,
        memory_total_bytes=sample.memory_total_bytes if sample else None,
        registered=registered,
    )


def of_service(svc: ServiceState, strategy: str, gs: GpuState | None, sample: GpuSample | None) -> Decision:
    """A registered service's decision, from its state."""
    return on_gpu(svc.service, svc.batch_size, svc.optimal, strategy, svc.reason, svc.updated_at, svc.gpu, gs, sample)


def unregistered(service: str, index: int, now: float, why: str, policy_settings: Settings, strategy: str,
                 gs: GpuState | None, sample: GpuSample | None) -> Decision:
    """The answer to an unknown name: the minimum batch, no share of the GPU, nothing registered."""
    lo, _ = policy_settings.batch_limits(policy_settings.profile(service))
    return on_gpu(service, lo, lo, strategy, f"not registered ({why}): the minimum batch size, with no share of "
                  "the GPU", now, index, gs, sample, registered=False)


def cpu_only(service: str, now: float, policy_settings: Settings, strategy: str) -> Decision:
    """No GPU on this host: no GPU memory constrains the batch (seed 003: CPU takes the maximum)."""
    _, hi = policy_settings.batch_limits(policy_settings.profile(service))
    return Decision(service=service, batch_size=hi, optimal_batch_size=hi, strategy=strategy,
                    pressure=Pressure.NORMAL.value, cleanup_epoch=0,
                    reason="no GPU on this host: the maximum batch size", updated_at=now, gpu_index=None,
                    gpu_uuid=None, gpu_name=None, memory_used_bytes=None, memory_total_bytes=None)
