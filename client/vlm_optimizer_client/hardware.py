"""The ``hwFetch``-style one-line hardware summary (CLAMS), from PyTorch or from the optimizer's decision.

Units: bytes in, MB (MiB, 2**20 bytes, what ``nvidia-smi`` and CLAMS call "MB") out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm_optimizer_client import validate
from vlm_optimizer_client._torch import _torch_cuda

__all__ = ["MIB", "hw_summary", "hw_summary_from_decision", "hw_summary_from_torch"]

MIB = 1024**2
"""Bytes in the "MB" of ``nvidia-smi``, CLAMS's ``gpu_mem_typ`` and :func:`hw_summary`."""


def hw_summary(name: str, total_bytes: int | None, available_bytes: int | None,
               peak_bytes: int | None) -> str:
    """One line like CLAMS's ``hwFetch``, figures in MB (MiB, rounded down)::

        NVIDIA H100 80GB HBM3, 81559 MB total, 20480 MB available, 3584 MB peak used

    A figure that is None is left out.
    """
    parts = [name.strip() or "unknown GPU"]
    for value, label in ((total_bytes, "total"), (available_bytes, "available"), (peak_bytes, "peak used")):
        if value is not None:
            parts.append(f"{value // MIB} MB {label}")
    return ", ".join(parts)


def hw_summary_from_torch(device: int | None = None) -> str | None:
    """:func:`hw_summary` of ``device`` (None: current) from PyTorch; None unless the service loaded
    PyTorch and CUDA is usable.

    Available is the driver's free memory (``mem_get_info``); peak is
    ``torch.cuda.max_memory_allocated``.
    """
    cuda = _torch_cuda()
    if cuda is None:
        return None
    free, total = cuda.mem_get_info(device)
    return hw_summary(str(cuda.get_device_name(device)), int(total), int(free),
                      int(cuda.max_memory_allocated(device)))


def hw_summary_from_decision(decision: Mapping[str, Any], peak_bytes: int | None = None) -> str:
    """:func:`hw_summary` from the optimizer's ``GET /batch-size`` answer (its ``gpu`` block).

    Available is ``memory_total_bytes - memory_used_bytes`` (all processes, as NVML sees them);
    ``peak_bytes`` is the caller's own measurement, if any. A ``null`` ``gpu`` gives ``"no GPU"``.

    Raises:
        ValueError: the ``gpu`` block is missing or its figures are not non-negative integers.
    """
    if "gpu" not in decision:
        validate.fail("decision", "a decision with a 'gpu' block", decision)
    gpu = decision["gpu"]
    if gpu is None:
        return "no GPU"
    if not isinstance(gpu, Mapping):
        validate.fail("decision.gpu", "an object or null", gpu)
    figures: dict[str, int] = {}
    for key in ("memory_total_bytes", "memory_used_bytes"):
        value = gpu.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            validate.fail(f"decision.gpu.{key}", "an integer >= 0", value)
        figures[key] = value
    total = figures["memory_total_bytes"]
    available = max(0, total - figures["memory_used_bytes"])
    name = gpu.get("name")
    return hw_summary(name if isinstance(name, str) else "unknown GPU", total, available, peak_bytes)
