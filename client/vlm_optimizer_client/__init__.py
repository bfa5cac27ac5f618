"""The client library VLM services use to follow the optimizer (distribution ``vlm-gpu-optimizer-client``).

It depends on nothing but the standard library: aiohttp only for the async faces when it is installed
(the ``[async]`` extra), http.client in a thread otherwise; PyTorch only when the service has already
imported it. It imports nothing of the optimizer's server. Every public name is importable from here
(``from vlm_optimizer_client import BatchSizeClient, Reporter``); the modules, one idea each:

- :mod:`~vlm_optimizer_client.follow`: follow ``GET /batch-size`` (``BatchSizeClient``, ``AsyncBatchSizeClient``),
  over the state machine in ``_follower`` and the answers' checks in :mod:`~vlm_optimizer_client.decision`;
- :mod:`~vlm_optimizer_client.telemetry`: report batches (``Reporter``, ``AsyncReporter``), over ``_reporting``;
  :mod:`~vlm_optimizer_client.measuring`: measure one batch (``measure``);
- :mod:`~vlm_optimizer_client.oom`: survive CUDA out-of-memory errors (``recover_oom``, ``oom_attempts``);
- :mod:`~vlm_optimizer_client.admission`: VRAM admission (``VRAMGuard``, ``vram_middleware``), with the
  memory profiles in :mod:`~vlm_optimizer_client.profiles`;
- :mod:`~vlm_optimizer_client.workers`: the worker count; :mod:`~vlm_optimizer_client.hardware`: the
  hardware summary; :mod:`~vlm_optimizer_client.limits`: concurrency limits per kind of work;
- :mod:`~vlm_optimizer_client.validate`: the one check of every argument, and its one error
  (``InvalidArgument``); ``_torch``: what the client does with PyTorch when the service loaded it.

Logs go to the standard :mod:`logging` logger ``vlm_optimizer_client``.
"""

from __future__ import annotations

from vlm_optimizer_client._torch import (default_cleanup, empty_cache, gpu_identity, is_cpu_device, loaded_torch,
                                         torch_available_bytes, torch_peak_bytes, torch_total_bytes)
from vlm_optimizer_client.admission import (DEFAULT_RETRY_AFTER_S, Admission, InsufficientVRAMError, VRAMGuard,
                                            check_vram, vram_middleware)
from vlm_optimizer_client.decision import BadAnswer, parse_decision
from vlm_optimizer_client.follow import AsyncBatchSizeClient, BatchSizeClient
from vlm_optimizer_client.hardware import MIB, hw_summary, hw_summary_from_decision, hw_summary_from_torch
from vlm_optimizer_client.identity import POD_ENV, pod_from_env
from vlm_optimizer_client.limits import ConcurrencyLimits
from vlm_optimizer_client.measuring import ReportTarget, measure
from vlm_optimizer_client.oom import (OOM_MESSAGES, STRATEGIES, Attempt, OomAttempts, OomReporter, RecoveryPolicy,
                                      is_oom_error, oom_attempts, recover_oom)
from vlm_optimizer_client.profiles import DEFAULT_FIRST_RUN_SHARE, DEFAULT_HEADROOM, VRAMProfiles
from vlm_optimizer_client.telemetry import AsyncReporter, DecisionSink, Measurement, Reporter, ReporterStats
from vlm_optimizer_client.validate import DEFAULT_URL, URL_ENV, InvalidArgument
from vlm_optimizer_client.workers import WORKERS_ENV, WorkerPlan, plan_workers, worker_count

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FIRST_RUN_SHARE", "DEFAULT_HEADROOM", "DEFAULT_RETRY_AFTER_S", "DEFAULT_URL", "MIB", "OOM_MESSAGES",
    "POD_ENV", "STRATEGIES", "URL_ENV", "WORKERS_ENV", "Admission", "AsyncBatchSizeClient", "AsyncReporter",
    "Attempt", "BadAnswer", "BatchSizeClient", "ConcurrencyLimits", "DecisionSink", "InsufficientVRAMError",
    "InvalidArgument", "Measurement", "OomAttempts", "OomReporter", "RecoveryPolicy", "ReportTarget", "Reporter",
    "ReporterStats", "VRAMGuard", "VRAMProfiles", "WorkerPlan", "check_vram", "default_cleanup", "empty_cache",
    "gpu_identity", "hw_summary", "hw_summary_from_decision", "hw_summary_from_torch", "is_cpu_device",
    "is_oom_error", "loaded_torch", "measure", "oom_attempts", "parse_decision", "plan_workers", "pod_from_env",
    "recover_oom", "torch_available_bytes", "torch_peak_bytes", "torch_total_bytes", "vram_middleware",
    "worker_count",
]
