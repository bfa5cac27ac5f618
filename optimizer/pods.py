"""What the optimizer reads from a pod: its service, readiness, declared profile and GPU.

Pods arrive as plain JSON objects (``dict``), exactly as the API server sends them; nothing here
imports the Kubernetes client. Annotations (all under ``vlm-gpu-optimizer/``) declare a profile:

=========================== ======================================================= ==========
annotation                  meaning                                                 values
=========================== ======================================================= ==========
``service``                 the service name (else the ``service_label`` label)     1-128 chars
``per_item_mb``             GPU memory of one more item in a batch (MiB)            (0, 1e7]
``min_batch_size``          smallest batch the service may be given                 1-4096
``max_batch_size``          largest batch                                            1-4096
``default_batch_size``      the batch before the first optimization                 1-4096
``weight``                  share of a GPU's headroom against the other services    (0, 1e6]
``gpu_mem_min``             CLAMS: the least VRAM the model needs to load (MB)      0-16777216
``gpu_mem_typ``             CLAMS: typical VRAM with default parameters (MB)        0-16777216
``gpu``                     the GPU the pod uses: an index or a UUID (GPU-...)      0-1023, GPU-…
=========================== ======================================================= ==========

A bad value is reported as an :class:`AnnotationProblem` (pod, key, value, what is allowed) and
ignored; the other annotations still count. As in CLAMS, a ``gpu_mem_typ`` below ``gpu_mem_min``
is raised to it (with a problem reported).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from optimizer.config.kube import PREFIX
from optimizer.values import SERVICE_RE, SERVICE_RULE

GPU_RE = re.compile(r"(GPU|MIG)-[A-Za-z0-9-]{1,100}")

#: Annotations the optimizer writes when publishing is on.
BATCH_SIZE_ANNOTATION = PREFIX + "batch_size"
CLEANUP_EPOCH_ANNOTATION = PREFIX + "cleanup_epoch"
PUBLISHED = (BATCH_SIZE_ANNOTATION, CLEANUP_EPOCH_ANNOTATION)

PROFILE_KEYS = ("per_item_mb", "min_batch_size", "max_batch_size", "default_batch_size", "weight",
                "gpu_mem_min", "gpu_mem_typ", "gpu")


@dataclass(frozen=True, slots=True)
class DeclaredProfile:
    """What a pod's annotations declare; ``None`` where they say nothing (or something invalid)."""

    per_item_mb: float | None = None
    min_batch_size: int | None = None
    max_batch_size: int | None = None
    default_batch_size: int | None = None
    weight: float | None = None
    gpu_mem_min_mb: int | None = None
    gpu_mem_typ_mb: int | None = None
    gpu: int | str | None = None  # a GPU index or UUID

    @property
    def footprint_mb(self) -> int | None:
        """The memory the pod's model is expected to take once loaded (MB): ``gpu_mem_typ``, else ``gpu_mem_min``."""
        for v in (self.gpu_mem_typ_mb, self.gpu_mem_min_mb):
            if v:
                return v
        return None


@dataclass(frozen=True, slots=True)
class AnnotationProblem:
    pod: str  # namespace/name
    key: str
    value: str
    message: str


@dataclass(frozen=True, slots=True)
class PodInfo:
    """One pod on this node, as last seen. ``key`` is ``namespace/name``."""

    namespace: str
    name: str
    uid: str
    node: str | None
    service: str | None  # None: neither the annotation nor the label names a valid service
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool  # the Ready condition is True (and the pod is not being deleted)
    deleting: bool  # metadata.deletionTimestamp is set
    resource_version: str
    profile: DeclaredProfile = field(default_factory=DeclaredProfile)
    published: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # our annotations' values
    ips: tuple[str, ...] = ()  # status.podIPs (else status.podIP): where its requests come from; () until assigned

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminal(self) -> bool:
        """The pod's containers have stopped for good: it holds no GPU memory."""
        return self.phase in ("Succeeded", "Failed")

    @property
    def state(self) -> str:
        """One word for metrics and ``GET /services``: ready, starting, unready, terminating or finished."""
        if self.terminal:
            return "finished"
        if self.deleting:
            return "terminating"
        if self.ready:
            return "ready"
        return "starting" if self.phase == "Pending" else "unready"


_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _number(raw: str, lo: float, hi: float, *, integer: bool, lo_open: bool = False) -> float | int | None:
    text = raw.strip()
    # plain ASCII numbers only: int() and float() also take "1_000" and non-ASCII digits
    if not (_INT_TEXT if integer else _FLOAT_TEXT).fullmatch(text):
        return None
    try:
        v: float | int = int(text) if integer else float(text)
    except ValueError:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v > hi or v < lo or (lo_open and v == lo):
        return None
    return v


_RULES: dict[str, tuple[float, float, bool, bool, str]] = {
    # key: (lo, hi, integer, lo_open, allowed-values text)
    "per_item_mb": (0.0, 1e7, False, True, "a number of MiB in (0, 10000000]"),
    "min_batch_size": (1, 4096, True, False, "an integer in [1, 4096]"),
    "max_batch_size": (1, 4096, True, False, "an integer in [1, 4096]"),
    "default_batch_size": (1, 4096, True, False, "an integer in [1, 4096]"),
    "weight": (0.0, 1e6, False, True, "a number in (0, 1000000]"),
    "gpu_mem_min": (0, 1 << 24, True, False, "an integer number of MB in [0, 16777216]"),
    "gpu_mem_typ": (0, 1 << 24, True, False, "an integer number of MB in [0, 16777216]"),
}


def parse_profile(pod: str, annotations: Mapping[str, str]) -> tuple[DeclaredProfile, list[AnnotationProblem]]:
    """The declared profile from a pod's annotations, and what was wrong with them."""
    problems: list[AnnotationProblem] = []
    values: dict[str, Any] = {}
    for name, (lo, hi, integer, lo_open, allowed) in _RULES.items():
        raw = annotations.get(PREFIX + name)
        if raw is None:
            continue
        v = _number(str(raw), lo, hi, integer=integer, lo_open=lo_open)
        if v is None:
            problems.append(AnnotationProblem(pod, PREFIX + name, str(raw)[:64], f"must be {allowed}"))
        else:
            values[name] = v
    gpu_raw = annotations.get(PREFIX + "gpu")
    gpu: int | str | None = None
    if gpu_raw is not None:
        g = str(gpu_raw).strip()
        if re.fullmatch(r"[0-9]{1,4}", g) and int(g) <= 1023:
            gpu = int(g)
        elif GPU_RE.fullmatch(g):
            gpu = g
        else:
            problems.append(AnnotationProblem(pod, PREFIX + "gpu", g[:64],
                                              "must be a GPU index in [0, 1023] or a UUID (GPU-... or MIG-...)"))
    lo_b, hi_b = values.get("min_batch_size"), values.get("max_batch_size")
    if lo_b is not None and hi_b is not None and lo_b > hi_b:
        problems.append(AnnotationProblem(pod, PREFIX + "min_batch_size", str(lo_b),
                                          f"must be <= max_batch_size ({hi_b}); both ignored"))
        values.pop("min_batch_size")
        values.pop("max_batch_size")
    mem_min, mem_typ = values.get("gpu_mem_min"), values.get("gpu_mem_typ")
    if mem_min is not None and mem_typ is not None and mem_typ < mem_min:
        problems.append(AnnotationProblem(pod, PREFIX + "gpu_mem_typ", str(mem_typ),
                                          f"is below gpu_mem_min ({mem_min}); raised to it (as CLAMS does)"))
        values["gpu_mem_typ"] = mem_min
    profile = DeclaredProfile(
        per_item_mb=values.get("per_item_mb"),
        min_batch_size=values.get("min_batch_size"),
        max_batch_size=values.get("max_batch_size"),
        default_batch_size=values.get("default_batch_size"),
        weight=values.get("weight"),
        gpu_mem_min_mb=values.get("gpu_mem_min"),
        gpu_mem_typ_mb=values.get("gpu_mem_typ"),
        gpu=gpu,
    )
    return profile, problems


def _ready(status: Mapping[str, Any]) -> bool:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's IP addresses: ``status.podIPs[*].ip`` (dual stack: one per family), else ``status.podIP``.

    Empty while the pod has none (not scheduled, or its sandbox not created yet). A hostNetwork pod's
    IP is its node's.
    """
    out: list[str] = []
    for entry in status.get("podIPs") or ():
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        if isinstance(ip, str) and ip and ip not in out:
            out.append(ip)
    single = status.get("podIP")
    if isinstance(single, str) and single and single not in out:
        out.insert(0, single)
    return tuple(out)


def pod_from_object(obj: Mapping[str, Any], service_label: str) -> tuple[PodInfo, list[AnnotationProblem]]:
    """A :class:`PodInfo` from a pod as the API sends it (JSON). Raises ``ValueError`` without a name."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("pod object without metadata.name")
    key = f"{namespace}/{name}"
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    problems: list[AnnotationProblem] = []
    service: str | None = None
    declared = annotations.get(PREFIX + "service")
    if declared is not None:
        if SERVICE_RE.fullmatch(declared):
            service = declared
        else:
            problems.append(AnnotationProblem(key, PREFIX + "service", declared[:64],
                                              f"must be {SERVICE_RULE}"))
    if service is None and SERVICE_RE.fullmatch(labels.get(service_label, "")):
        service = labels[service_label]
    profile, more = parse_profile(key, annotations)
    problems += more
    deleting = meta.get("deletionTimestamp") is not None
    info = PodInfo(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        node=spec.get("nodeName"),
        service=service,
        phase=str(status.get("phase") or "Unknown"),
        ready=_ready(status) and not deleting,
        deleting=deleting,
        resource_version=str(meta.get("resourceVersion") or ""),
        profile=profile,
        published=MappingProxyType({k: annotations[k] for k in PUBLISHED if k in annotations}),
        ips=pod_ips(status),
    )
    return info, problems
