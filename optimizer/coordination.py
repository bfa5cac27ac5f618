"""Coordination across services: from the pods discovery sees to the policy's :class:`Roster`.

Pure functions; the engine calls them whenever the pods, the samples or the reports move.

- **Which GPU a pod uses**: the devices the kubelet allocated to its containers (the pod-resources
  API, when its socket is mounted: GPU or MIG UUIDs matched to the samples' ``uuid``; a pod given
  two GPUs counts on both); else its ``vlm-gpu-optimizer/gpu`` annotation; else the GPU its own polls or
  reports named (they carry the pod's name); else the node's only GPU; else unknown, and the pod
  is counted on every GPU of the node (conservative: its share is held back everywhere until it
  says where it runs).
- **Who shares a GPU**: the pods that are ready, and the pods that are starting (never ready yet),
  so that the others make room before a new pod loads. A pod that was ready and turns unready, is
  being deleted, or has finished releases its share at the next decision.
- **Memory a starting pod will take**: its declared ``gpu_mem_typ`` (else ``gpu_mem_min``) is
  held back on each of its GPU(s) until it is ready (its model is then in the samples).
- **Profiles**: the pods' annotations override the configuration's profile of their service, key
  by key; pods of one service that disagree are read in name order and the first value wins.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Mapping
from types import MappingProxyType

from optimizer.config import ServiceProfile, Settings
from optimizer.gpu.types import GpuSample
from optimizer.pods import PodInfo
from optimizer.policy.types import MIB, Roster

EMPTY_ROSTER = Roster()


def counted(pod: PodInfo, ever_ready: Collection[str]) -> bool:
    """Whether the pod holds a share: ready, or starting (scheduled, never ready yet)."""
    if pod.terminal or pod.deleting or pod.service is None:
        return False
    return pod.ready or pod.uid not in ever_ready


def starting(pod: PodInfo, ever_ready: Collection[str]) -> bool:
    """Counted but not ready yet: its model may not be in GPU memory."""
    return counted(pod, ever_ready) and not pod.ready


def declared_gpu(pod: PodInfo, gpus: list[GpuSample]) -> int | None:
    """The GPU index the pod's ``gpu`` annotation names, if it names one of this node's GPUs."""
    g = pod.profile.gpu
    if g is None:
        return None
    for sample in gpus:
        if sample.index == g or sample.uuid == g:
            return sample.index
    return None


def pod_gpu(pod: PodInfo, reported: Mapping[str, int], gpus: list[GpuSample]) -> tuple[int | None, str]:
    """(GPU index or None, how it is known: ``annotation``, ``reports``, ``only_gpu`` or ``unknown``)."""
    declared = declared_gpu(pod, gpus)
    if declared is not None:
        return declared, "annotation"
    for ident in (pod.key, pod.name):
        index = reported.get(ident)
        if index is not None and any(s.index == index for s in gpus):
            return index, "reports"
    if len(gpus) == 1:
        return gpus[0].index, "only_gpu"
    return None, "unknown"


def kubelet_gpus(device_ids: Collection[str], gpus: list[GpuSample]) -> tuple[int, ...]:
    """The indexes of this node's GPU entries the kubelet's device IDs name (a UUID, or an NVML index).

    An index (``deviceIDStrategy: index``) names a whole GPU, never a MIG entry (the plugin writes
    those ``gpu:mig``, which is not read).
    """
    out: set[int] = set()
    for ident in device_ids:
        for sample in gpus:
            whole = not str(sample.uuid or "").startswith("MIG-")
            if sample.uuid == ident or (ident.isdigit() and whole and sample.index == int(ident)):
                out.add(sample.index)
    return tuple(sorted(out))


def pod_gpus(pod: PodInfo, reported: Mapping[str, int], gpus: list[GpuSample],
             devices: Mapping[str, tuple[str, ...]] | None = None) -> tuple[tuple[int, ...], str]:
    """(the pod's GPU indexes, how they are known): ``kubelet`` first, then as :func:`pod_gpu`.

    ``devices`` is the kubelet's latest answer (pod key to device IDs). Empty indexes: unknown (the
    pod then counts on every GPU).
    """
    if devices:
        on = kubelet_gpus(devices.get(pod.key, ()), gpus)
        if on:
            return on, "kubelet"
    index, source = pod_gpu(pod, reported, gpus)
    return ((index,) if index is not None else ()), source


def build_roster(pods: Mapping[str, PodInfo], ever_ready: Collection[str], reported: Mapping[str, int],
                 gpus: list[GpuSample], devices: Mapping[str, tuple[str, ...]] | None = None) -> Roster:
    """The policy's view of who shares each GPU (see the module docstring)."""
    if not pods:
        return EMPTY_ROSTER
    indexes = [g.index for g in gpus]
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    reserved: dict[int, int] = defaultdict(int)
    managed: set[str] = set()
    for pod in pods.values():
        if pod.service is None:
            continue
        managed.add(pod.service)
        if not counted(pod, ever_ready):
            continue
        known, _ = pod_gpus(pod, reported, gpus, devices)
        on = list(known) or indexes
        footprint = pod.profile.footprint_mb if starting(pod, ever_ready) else None
        for i in on:
            counts[i][pod.service] = counts[i].get(pod.service, 0) + 1
            if footprint:
                reserved[i] += footprint * MIB
    return Roster(
        managed=frozenset(managed),
        pods=MappingProxyType({i: MappingProxyType(c) for i, c in counts.items()}),
        reserved_bytes=MappingProxyType(dict(reserved)),
    )


_PROFILE_FIELDS = ("per_item_mb", "min_batch_size", "max_batch_size", "default_batch_size", "weight")


def declared_profiles(settings: Settings, pods: Mapping[str, PodInfo]) -> tuple[ServiceProfile, ...]:
    """The profiles of services whose pods declare something, over the configured profiles."""
    by_service: dict[str, dict[str, object]] = {}
    for key in sorted(pods):
        pod = pods[key]
        if pod.service is None:
            continue
        fields = by_service.setdefault(pod.service, {})
        for name in _PROFILE_FIELDS:
            value = getattr(pod.profile, name)
            if value is not None and name not in fields:
                fields[name] = value
    out = []
    for service, fields in sorted(by_service.items()):
        if not fields:
            continue
        base = settings.profile(service)
        profile = dataclasses.replace(base, **fields)  # type: ignore[arg-type]
        lo, hi = profile.min_batch_size, profile.max_batch_size
        if lo is not None and hi is not None and lo > hi:
            # One bound from the annotations, the other from the configuration: the annotation wins.
            if "min_batch_size" in fields:
                profile = dataclasses.replace(profile, max_batch_size=lo)
            else:
                profile = dataclasses.replace(profile, min_batch_size=hi)
        out.append(profile)
    return tuple(out)


def effective_settings(settings: Settings, pods: Mapping[str, PodInfo]) -> Settings:
    """``settings`` with the pods' declared profiles in place of the configured ones of their services."""
    declared = declared_profiles(settings, pods)
    if not declared:
        return settings
    names = {p.name for p in declared}
    return dataclasses.replace(settings, profiles=tuple(p for p in settings.profiles if p.name not in names)
                               + declared)
