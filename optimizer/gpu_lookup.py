"""Which GPU a request means: by index, by UUID, by MIG ``parent:instance``, or by the service's known GPU.

Pure lookups over the latest :class:`Snapshot` (``None`` before the first sample) and the registered
(GPU, service) pairs; the engine calls them for every poll, report and operator action.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from optimizer.gpu.types import MIG_SELECTOR_RE, GpuSample
from optimizer.policy.types import Snapshot


class UnknownGpu(LookupError):
    """A request named a GPU this host does not have.

    ``available`` lists the valid indexes; ``selectors`` the other names that work: every entry's UUID
    and, for a MIG device, its ``parent:gpu_instance`` form.
    """

    def __init__(self, selector: str | int, available: list[int], selectors: list[str] | None = None) -> None:
        names = f"; or by UUID / parent:instance: {', '.join(selectors)}" if selectors else ""
        super().__init__(f"no GPU {selector!r}; available GPU indexes: {available or 'none'}{names}")
        self.available = available
        self.selectors = selectors or []


def gpu_sample(snapshot: Snapshot | None, index: int) -> GpuSample | None:
    """GPU ``index``'s entry in ``snapshot``; ``None`` if it has none."""
    if snapshot is None:
        return None
    for g in snapshot.gpus:
        if g.index == index:
            return g
    return None


def gpu_indexes(snapshot: Snapshot | None) -> list[int]:
    """The GPU indexes of ``snapshot``, sorted."""
    return sorted(g.index for g in snapshot.gpus) if snapshot else []


def resolve_gpu(snapshot: Snapshot | None, registered: Collection[tuple[int, str]], has_gpus: bool,
                service: str, selector: int | str | None) -> int | None:
    """A GPU index from an index, a UUID, or nothing (the service's known GPU, else the first working one).

    ``None`` means this host has no GPU (``has_gpus`` false: backend ``none``). Raises :class:`UnknownGpu`.
    """
    indexes = gpu_indexes(snapshot)
    if selector is None:
        # After a sample every service is on one of its GPUs (decide drops the others): look those up,
        # a few dictionary lookups, rather than scan every service on every poll.
        candidates = indexes if snapshot is not None else sorted({gi for gi, _ in registered})
        known = [gi for gi in candidates if (gi, service) in registered]
        if known:
            return known[0]
        if not indexes:
            if has_gpus:
                return 0  # before the first sample (or NVML sees none yet): assume the usual first GPU
            return None
        working = [g.index for g in snapshot.gpus if not g.failed] if snapshot else []
        return (working or indexes)[0]
    if isinstance(selector, int):
        if selector in indexes or (snapshot is None and has_gpus):
            return selector
        raise UnknownGpu(selector, indexes, gpu_selectors(snapshot))
    found = gpu_by_name(snapshot, selector)
    if found is not None:
        return found
    raise UnknownGpu(selector, indexes, gpu_selectors(snapshot))


@dataclass(frozen=True, slots=True)
class GpuIndex:
    """One snapshot's GPUs by index and by UUID, built once per sample: what every poll and report looks up.

    The same answers as :func:`gpu_sample`, :func:`gpu_indexes` and :func:`resolve_gpu` over ``snapshot``,
    by dictionary instead of a scan of the snapshot (docs/architecture.md, "The hot paths").
    """

    snapshot: Snapshot | None = None
    indexes: tuple[int, ...] = ()  # sorted
    by_index: Mapping[int, GpuSample] = field(default_factory=dict)  # the first entry of each index
    by_uuid: Mapping[str, int] = field(default_factory=dict)  # the first entry of each UUID
    first_working: int | None = None  # the first entry (in the snapshot's order) that has not failed

    @classmethod
    def of(cls, snapshot: Snapshot | None) -> GpuIndex:
        if snapshot is None:
            return cls()
        by_index: dict[int, GpuSample] = {}
        by_uuid: dict[str, int] = {}
        for g in snapshot.gpus:
            by_index.setdefault(g.index, g)
            by_uuid.setdefault(g.uuid, g.index)
        working = next((g.index for g in snapshot.gpus if not g.failed), None)
        return cls(snapshot, tuple(sorted(g.index for g in snapshot.gpus)), by_index, by_uuid, working)

    def resolve(self, registered: Collection[tuple[int, str]], has_gpus: bool, service: str,
                selector: int | str | None) -> int | None:
        """:func:`resolve_gpu` over this index's snapshot: the same index, the same :class:`UnknownGpu`."""
        snapshot = self.snapshot
        if snapshot is None:
            return resolve_gpu(None, registered, has_gpus, service, selector)
        if selector is None:
            for gi in self.indexes:  # a few dictionary lookups (one per GPU), not a scan of the services
                if (gi, service) in registered:
                    return gi
            if not self.indexes:
                return 0 if has_gpus else None
            return self.first_working if self.first_working is not None else self.indexes[0]
        if isinstance(selector, int):
            if selector in self.by_index:
                return selector
            raise UnknownGpu(selector, list(self.indexes), gpu_selectors(snapshot))
        found = self.by_uuid.get(selector)
        if found is None:
            found = gpu_by_name(snapshot, selector)  # a MIG parent:instance (or nothing)
        if found is not None:
            return found
        raise UnknownGpu(selector, list(self.indexes), gpu_selectors(snapshot))


def gpu_by_name(snapshot: Snapshot | None, selector: str) -> int | None:
    """The index of the entry named by UUID (``GPU-...``, ``MIG-...``) or ``parent:gi[:ci]``; None if none.

    ``parent:gi`` is the MIG device of GPU instance ``gi`` on parent ``parent`` (its lowest compute
    instance, where a GPU instance is split; ``parent:gi:ci`` names one). What discovery calls with the
    device IDs the kubelet lists (GPU or MIG UUIDs).
    """
    gpus = snapshot.gpus if snapshot else ()
    for g in gpus:
        if g.uuid == selector:
            return g.index
    m = MIG_SELECTOR_RE.fullmatch(selector)
    if m is None:
        return None
    parent, gi = int(m.group(1)), int(m.group(2))
    ci = None if m.group(3) is None else int(m.group(3))
    mig = sorted((g.compute_instance_id or 0, g.index) for g in gpus
                 if g.parent_index == parent and g.gpu_instance_id == gi
                 and (ci is None or g.compute_instance_id == ci))
    return mig[0][1] if mig else None


def gpu_selectors(snapshot: Snapshot | None) -> list[str]:
    """The names besides the index that select an entry now: UUIDs, and ``parent:instance`` for MIG."""
    out: list[str] = []
    for g in sorted(snapshot.gpus, key=lambda g: g.index) if snapshot else ():
        out.append(g.uuid)
        if g.mig_selector is not None:
            out.append(g.mig_selector)
    return out
