"""What the client does with PyTorch, only when the service has imported it.

No client module imports :mod:`torch`: a first ``import torch`` costs seconds (on the request path of
an aiohttp service), and in a process that forks workers could initialise CUDA in the wrong process.
They ask :func:`loaded_torch` instead, which returns the module only when it is already loaded.
"""

from __future__ import annotations

import gc
import logging
import sys
import uuid as uuid_module
from types import ModuleType
from typing import Any

__all__ = ["default_cleanup", "empty_cache", "gpu_identity", "is_cpu_device", "loaded_torch", "torch_available_bytes",
           "torch_peak_bytes", "torch_total_bytes"]

log = logging.getLogger("vlm_optimizer_client")


def loaded_torch() -> ModuleType | None:
    """PyTorch if the application has imported it, else ``None``; importing it here would cost seconds
    and, in a process that forks workers, could initialise CUDA in the wrong process."""
    return sys.modules.get("torch")


def empty_cache() -> None:
    """Collect garbage and return the CUDA caching allocator's free blocks to the driver.

    ``torch.cuda.empty_cache()`` runs only when PyTorch is loaded and CUDA already initialised (it
    would otherwise initialise CUDA just to find nothing cached). Never raises.
    """
    gc.collect()
    torch = loaded_torch()
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception as exc:  # a broken driver must not hide the OOM being recovered from
        log.warning("empty_cache failed: %s", exc)


def is_cpu_device(device: Any) -> bool:
    """Whether ``device`` names the CPU (``"cpu"``, ``torch.device("cpu")``); ``None`` does not."""
    return device is not None and str(device).split(":")[0] == "cpu"


def default_cleanup() -> None:
    """What a service does when the optimizer raises a cleanup: collect garbage, empty the CUDA cache.

    Runs :func:`gc.collect`, then ``torch.cuda.empty_cache()`` if PyTorch is already imported by the
    service and CUDA is available. PyTorch is never imported here: a process that did not import it
    has no CUDA allocator cache to empty. Raises nothing that PyTorch does not raise.
    """
    gc.collect()
    torch: Any = loaded_torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_identity() -> str | None:
    """The UUID (``GPU-…``) of PyTorch's current CUDA device, or ``None``.

    ``None`` without PyTorch loaded, without CUDA, before CUDA is initialised (reading it would
    initialise CUDA), or with a PyTorch that does not expose ``get_device_properties(i).uuid``. A
    CUDA index is not used instead: under ``CUDA_VISIBLE_DEVICES`` it is not the optimizer's index.
    """
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not cuda.is_available() or not cuda.is_initialized():
            return None
        uuid = getattr(cuda.get_device_properties(cuda.current_device()), "uuid", None)
    except Exception as exc:
        log.debug("no GPU identity from torch: %s", exc)
        return None
    if uuid is None:
        return None
    raw = getattr(uuid, "bytes", None)  # PyTorch 2.4 printed these raw bytes; .bytes is reliable
    try:
        text = str(uuid_module.UUID(bytes=raw)) if isinstance(raw, bytes) and len(raw) == 16 else str(uuid)
    except Exception:
        return None
    if not text:
        return None
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _torch_cuda() -> Any | None:
    """``torch.cuda`` when the service has loaded PyTorch and a CUDA device is usable, else None.

    PyTorch is never imported here (as in :func:`loaded_torch`): the guard runs
    on the request path, where a first ``import torch`` would block the event loop for a second or more,
    and a process that did not import it has no CUDA memory of its own to measure.
    """
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        return cuda if cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken driver means "cannot measure", not a crash
        log.info("torch.cuda unusable", exc_info=True)
        return None


def torch_available_bytes(device: int | None = None) -> int | None:
    """Bytes this process could allocate now on ``device`` (None: the current device).

    That is the driver's free memory (``torch.cuda.mem_get_info()[0]``) plus what PyTorch's caching
    allocator holds but does not use (``memory_reserved - memory_allocated``), which the process can
    reuse without asking the driver. None unless the service loaded PyTorch and CUDA is usable.
    """
    cuda = _torch_cuda()
    if cuda is None:
        return None
    free, _total = cuda.mem_get_info(device)
    cached = max(0, int(cuda.memory_reserved(device)) - int(cuda.memory_allocated(device)))
    return int(free) + cached


def torch_total_bytes(device: int | None = None) -> int | None:
    """Total bytes of ``device`` (``torch.cuda.mem_get_info()[1]``); None unless the service loaded PyTorch
    and CUDA is usable."""
    cuda = _torch_cuda()
    if cuda is None:
        return None
    return int(cuda.mem_get_info(device)[1])


def torch_peak_bytes(device: int | None = None) -> int | None:
    """Peak bytes PyTorch allocated on ``device`` (``torch.cuda.max_memory_allocated``).

    This is the peak since the process started or since the last
    ``torch.cuda.reset_peak_memory_stats`` (this module never resets it: other code may rely on it).
    Only PyTorch allocations are seen. None unless the service loaded PyTorch and CUDA is usable.
    """
    cuda = _torch_cuda()
    if cuda is None:
        return None
    return int(cuda.max_memory_allocated(device))
