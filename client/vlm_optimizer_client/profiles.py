"""Per parameter set, the peak GPU memory of previous runs, on disk: :class:`VRAMProfiles`.

Files: ``$XDG_CACHE_HOME/vlm-gpu-optimizer/memory_profiles/<app_id>/<sha256>.txt`` (one integer, bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlm_optimizer_client import validate
from vlm_optimizer_client.hardware import MIB

__all__ = ["DEFAULT_FIRST_RUN_SHARE", "DEFAULT_HEADROOM", "VRAMProfiles"]

log = logging.getLogger("vlm_optimizer_client")

DEFAULT_FIRST_RUN_SHARE = 0.8
"""Share of the GPU's total memory a parameter set with no profile yet is assumed to need."""
DEFAULT_HEADROOM = 1.2
"""Factor applied to a profile's recorded peak to get the estimate (20% buffer)."""
PROFILE_NAMESPACE = ("vlm-gpu-optimizer", "memory_profiles")


def _cache_home(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME``, or ``~/.cache`` when it is unset, empty or relative (XDG base dir spec)."""
    value = environ.get("XDG_CACHE_HOME", "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / ".cache"


def _check_app_id(app_id: str) -> str:
    if not isinstance(app_id, str) or not app_id or app_id in (".", "..") \
            or any(c in app_id for c in "/\\\0") or app_id != app_id.strip():
        validate.fail("app_id", "a non-empty file name (no slashes, not '.' or '..')", app_id)
    return app_id


class VRAMProfiles:
    """Peak GPU memory of previous runs, per parameter set, on disk.

    Files: ``<cache>/vlm-gpu-optimizer/memory_profiles/<app_id>/<key>.txt`` where ``<cache>`` is
    ``cache_dir`` when given, else ``$XDG_CACHE_HOME`` (``~/.cache`` when unset), ``<key>`` is
    :meth:`key` of the parameters, and the file holds one integer: the peak in bytes.

    Reading never raises: a missing, unreadable or corrupt file means "no profile" (the last two are
    logged). Writing is atomic (temporary file + ``os.replace``); a failed write is logged and
    reported as ``False``. Concurrent writers (several workers) cannot tear a file, but two workers
    recording at the same moment may keep the lower of their two peaks: the next larger run fixes it.
    """

    def __init__(self, app_id: str, cache_dir: str | os.PathLike[str] | None = None, *,
                 first_run_share: float = DEFAULT_FIRST_RUN_SHARE, headroom: float = DEFAULT_HEADROOM,
                 environ: Mapping[str, str] | None = None) -> None:
        """
        Args:
            app_id: the service's name; one file name (no slashes).
            cache_dir: replaces ``$XDG_CACHE_HOME`` as the cache root.
            first_run_share: share of total memory assumed for a parameter set without profile,
                in ``(0, 1]``.
            headroom: factor over a recorded peak, ``>= 1``.
            environ: where ``XDG_CACHE_HOME`` is read (default ``os.environ``), read once here.

        Raises:
            ValueError: a bad ``app_id``, ``first_run_share`` or ``headroom``.
        """
        self.app_id = _check_app_id(app_id)
        validate.number("first_run_share", first_run_share, "a share in (0, 1]", lo=0.0, hi=1.0, lo_open=True)
        validate.number("headroom", headroom, "a finite factor >= 1", lo=1.0)
        self.first_run_share = float(first_run_share)
        self.headroom = float(headroom)
        root = Path(cache_dir) if cache_dir is not None else _cache_home(os.environ if environ is None else environ)
        self.directory = root.joinpath(*PROFILE_NAMESPACE, self.app_id)

    @staticmethod
    def key(params: Mapping[str, Any]) -> str:
        """The profile key of ``params``: sha256 (hex) of their canonical JSON (sorted keys, compact).

        The same parameters in any order give the same key.

        Raises:
            TypeError: ``params`` is not JSON-serialisable (or its keys are not all strings).
        """
        if any(not isinstance(k, str) for k in params):
            validate.fail("params", "a mapping with string keys", dict(params))
        canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               allow_nan=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def path(self, params: Mapping[str, Any]) -> Path:
        """The profile file of ``params`` (it may not exist)."""
        return self.directory / f"{self.key(params)}.txt"

    def peak(self, params: Mapping[str, Any]) -> int | None:
        """The recorded peak of ``params`` in bytes, or None when there is no usable profile."""
        path = self.path(params)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError, ValueError) as exc:
            log.warning("vram profile unreadable, treated as unknown: %s (%s)", path, exc)
            return None
        try:
            value = int(text.strip())
        except ValueError:
            value = -1
        if value < 0:
            log.warning("vram profile corrupt, treated as unknown: %s (content %r)", path, text[:40])
            return None
        return value

    def estimate(self, params: Mapping[str, Any], total_bytes: int) -> int:
        """Bytes ``params`` are expected to need: ``ceil(peak * headroom)`` with a profile, else
        ``ceil(total_bytes * first_run_share)``.

        Args:
            params: the parameter set.
            total_bytes: the GPU's total memory, in bytes.

        Raises:
            ValueError / TypeError: a bad ``total_bytes``; TypeError: non-serialisable ``params``.
        """
        validate.integer("total_bytes", total_bytes, 0, unit="bytes")
        peak = self.peak(params)
        if peak is None:
            return math.ceil(total_bytes * self.first_run_share)
        return math.ceil(peak * self.headroom)

    def record(self, params: Mapping[str, Any], peak_bytes: int) -> bool:
        """Remember ``peak_bytes`` for ``params`` when it exceeds the recorded peak (or none is).

        Returns:
            True when the profile was written, False when it was kept (not exceeded) or the write failed
            (logged).

        Raises:
            ValueError / TypeError: a bad ``peak_bytes``; TypeError: non-serialisable ``params``.
        """
        validate.integer("peak_bytes", peak_bytes, 0, unit="bytes")
        path = self.path(params)
        stored = self.peak(params)
        if stored is not None and peak_bytes <= stored:
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(f"{peak_bytes}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("vram profile not written: %s (%s)", path, exc)
            return False
        log.info("vram profile %s: peak %d MB (was %s)", path.name, peak_bytes // MIB,
                 "unknown" if stored is None else f"{stored // MIB} MB")
        return True

    def forget(self, params: Mapping[str, Any]) -> bool:
        """Delete the profile of ``params``; True when one existed. Raises OSError on other failures."""
        try:
            self.path(params).unlink()
        except FileNotFoundError:
            return False
        return True
