"""A client of the kubelet's pod-resources socket: ``List``, reduced to each pod's GPU device IDs.

The kubelet serves ``v1.PodResourcesLister`` on a unix socket (by default
``/var/lib/kubelet/pod-resources/kubelet.sock``). ``List`` names, for every pod on the node, each
container's devices by resource name (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``, ...) and
device ID: what the device plugin allocated. NVIDIA's plugin reports a GPU UUID (``GPU-...``), a
MIG UUID (``MIG-...``), a time-sliced replica (``GPU-...::N``) or, with ``deviceIDStrategy:
index``, an NVML index. :func:`gpu_devices` keeps only the GPU resources and normalises the IDs;
what it cannot read is counted, never raised.

:meth:`PodResourcesClient.list` is blocking (grpcio's synchronous stub, one channel per call, a
deadline on the call); discovery runs it in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

#: Resource names whose devices are GPUs: NVIDIA's device plugin (whole GPUs, shared replicas) and MIG.
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"

_UUID = re.compile(r"(GPU|MIG)-[A-Za-z0-9-]{1,100}")
_INDEX = re.compile(r"[0-9]{1,4}")
_MAX_MESSAGE = 16 * 1024 * 1024  # a List answer for a full node is a few KiB; anything near this is broken


class PodResourcesError(Exception):
    """The kubelet could not be asked, or answered something unreadable; ``reason`` is one word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Listing:
    """One ``List`` answer, reduced: each pod's GPU device IDs, and what was skipped."""

    devices: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))  # pod key -> IDs
    ignored_resources: tuple[str, ...] = ()  # resource names that are not GPUs (sorted, distinct)
    bad_device_ids: int = 0  # IDs of a GPU resource that are neither a UUID nor an index


def is_gpu_resource(name: str) -> bool:
    return name in GPU_RESOURCES or name.startswith(MIG_RESOURCE_PREFIX)


def normalise_device_id(device_id: str) -> str | int | None:
    """A GPU or MIG UUID (a shared replica's ``::N`` dropped), an NVML index, or None (unreadable)."""
    base = device_id.split("::", 1)[0].strip()
    if _UUID.fullmatch(base):
        return base
    if _INDEX.fullmatch(base):
        return int(base)
    return None


def gpu_devices(response: Any) -> Listing:
    """The pods' GPU device IDs from a ``ListPodResourcesResponse`` (any object with its fields)."""
    out: dict[str, list[str]] = {}
    ignored: set[str] = set()
    bad = 0
    for pod in response.pod_resources:
        if not pod.name:
            continue
        key = f"{pod.namespace or 'default'}/{pod.name}"
        for container in pod.containers:
            for dev in container.devices:
                if not is_gpu_resource(dev.resource_name):
                    ignored.add(dev.resource_name[:128])
                    continue
                for raw in dev.device_ids:
                    ident = normalise_device_id(raw)
                    if ident is None:
                        bad += 1
                        continue
                    ids = out.setdefault(key, [])
                    if str(ident) not in ids:
                        ids.append(str(ident))
    return Listing(devices=MappingProxyType({k: tuple(v) for k, v in out.items()}),
                   ignored_resources=tuple(sorted(ignored)), bad_device_ids=bad)


class PodResourcesClient:
    """``List`` on the kubelet's socket at ``socket_path``, with a deadline of ``timeout`` seconds."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def list(self) -> Listing:
        """Blocking. Raises :class:`PodResourcesError` (``timeout``, ``unavailable``, ``bad_answer``, ...)."""
        import grpc  # imported here: discovery without the socket never loads grpc

        from optimizer.kube.podresources import api_pb2, api_pb2_grpc

        options = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                   ("grpc.enable_http_proxy", 0),  # a unix socket: never through an HTTP(S)_PROXY
                   ("grpc.default_authority", "localhost")]
        try:
            with grpc.insecure_channel(f"unix://{self.socket_path}", options=options) as channel:
                stub = api_pb2_grpc.PodResourcesListerStub(channel)  # type: ignore[no-untyped-call]
                response = stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            name = code.name.lower() if code is not None else "rpc_error"
            reason = {"deadline_exceeded": "timeout"}.get(name, name)
            details = e.details() if hasattr(e, "details") else str(e)
            if "permission denied" in str(details).lower():
                reason = "permission_denied"  # the socket is root's: docs/kubernetes.md#pod-resources
            raise PodResourcesError(reason, f"pod-resources List on {self.socket_path}: {name}: "
                                    f"{str(details)[:200]}") from None
        return gpu_devices(response)
