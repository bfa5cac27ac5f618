"""The NVML backend's records of the devices it opened, and what NVML's return codes mean to it.

Shared by :mod:`optimizer.gpu.nvml` (sampling), :mod:`optimizer.gpu.nvml_health` and :mod:`optimizer.gpu.nvml_mig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# NVML return codes (from nvml.h); compared by value so that fakes need only NVMLError.value.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25

_UNKNOWN_FIELD_CODES = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION, NVML_ERROR_FUNCTION_NOT_FOUND})
_NO_V2_CODES = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH})


class GpuLost(Exception):
    """Internal: the device stopped answering; the sample of this GPU is marked failed."""


@dataclass
class _Device:
    index: int
    uuid: str
    name: str
    handle: Any  # None while the device could not be opened; retried every sample
    memory_v2: bool = True
    # -- health
    xid_registered: bool = False  # registered on the event set for Xid critical errors
    # MIG devices seen at the last listing (empty off MIG): failed in its place if the parent fails
    mig: list[_MigDevice] = field(default_factory=list)


@dataclass
class _MigDevice:
    """One MIG device (a compute instance of a GPU instance) of a parent GPU."""

    index: int  # mig_index(parent, gpu instance, compute instance)
    uuid: str
    name: str
    handle: Any
    gpu_instance_id: int
    compute_instance_id: int
    profile: str | None
    memory_v2: bool = True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
