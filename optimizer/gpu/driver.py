"""Is an NVIDIA driver present on this host? What ``--backend auto`` asks when NVML fails to start.

``auto`` may fall back to the GPU-less backend ``none`` (which publishes the maximum batch size) only
where there is no NVIDIA driver at all. The evidence, cheapest first:

- ``/dev/nvidiactl``: the driver's control device (present on the host, and in a container given
  GPUs by the NVIDIA Container Toolkit or device plugin);
- ``/proc/driver/nvidia`` and ``/sys/module/nvidia``: the kernel module is loaded (both show the
  host's kernel, also in a container that was given no GPU device);
- the NVML library loads: ``libnvidia-ml.so.1`` (the name ``pynvml`` itself loads on Linux; found
  through the dynamic loader, so ``LD_LIBRARY_PATH`` and the ld.so cache count), or on Windows
  ``nvml.dll`` where ``pynvml`` looks for it.

Any one of them means this is a GPU host whose NVML does not work: not a host without GPUs.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence

DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia", "/sys/module/nvidia")
LINUX_LIBRARY = "libnvidia-ml.so.1"

Probe = Callable[[], str | None]


def _windows_libraries() -> tuple[str, ...]:
    """The two places ``pynvml`` loads ``nvml.dll`` from (DCH drivers first)."""
    return (os.path.join(os.getenv("WINDIR", "C:/Windows"), "System32/nvml.dll"),
            os.path.join(os.getenv("ProgramFiles", "C:/Program Files"), "NVIDIA Corporation/NVSMI/nvml.dll"))


def nvml_library() -> str | None:
    """The NVML library that loads here (its name or path), or ``None``."""
    if sys.platform.startswith("win"):
        return next((p for p in _windows_libraries() if os.path.exists(p)), None)
    try:
        ctypes.CDLL(LINUX_LIBRARY)
    except OSError:
        return None
    return LINUX_LIBRARY


def nvidia_driver(paths: Sequence[str] = DRIVER_PATHS, *, exists: Callable[[str], bool] = os.path.exists,
                  library: Probe = nvml_library) -> str | None:
    """What shows an NVIDIA driver on this host (e.g. ``"/dev/nvidiactl exists"``), or ``None`` when nothing does.

    ``exists`` and ``library`` are injectable so that tests can stand for either kind of host.
    """
    for path in paths:
        if exists(path):
            return f"{path} exists"
    lib = library()
    return None if lib is None else f"{lib} loads"
