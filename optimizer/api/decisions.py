"""A :class:`~optimizer.engine.Decision` on the wire: its JSON object and its ETag (docs/api.md, ``GET /batch-size``).

The engine's decisions are plain values; every answer that carries one (``GET /batch-size``, ``GET /services``,
``POST /reports``, the admin API's overrides and optimizations) writes it with :func:`decision_dict`, and
``GET /batch-size`` validates it with :func:`decision_etag` (``optimizer/api/encoded.py`` caches both).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from optimizer.engine import Decision


def decision_dict(d: Decision) -> dict[str, Any]:
    """The JSON object of a decision (``gpu`` is null on a CPU-only host)."""
    gpu = None
    if d.gpu_index is not None:
        gpu = {
            "index": d.gpu_index,
            "uuid": d.gpu_uuid,
            "name": d.gpu_name,
            "memory_used_bytes": d.memory_used_bytes,
            "memory_total_bytes": d.memory_total_bytes,
        }
    return {
        "service": d.service,
        "batch_size": d.batch_size,
        "optimal_batch_size": d.optimal_batch_size,
        "strategy": d.strategy,
        "pressure": d.pressure,
        "cleanup_epoch": d.cleanup_epoch,
        "reason": d.reason,
        "updated_at": d.updated_at,
        "gpu": gpu,
        "registered": d.registered,
    }


def decision_etag(d: Decision) -> str:
    """A weak validator over what a service acts on (not the memory figures, which move every sample)."""
    key = json.dumps([d.service, d.gpu_index, d.batch_size, d.optimal_batch_size, d.strategy,
                      d.pressure, d.cleanup_epoch, d.reason, d.registered])
    return 'W/"' + hashlib.blake2b(key.encode(), digest_size=8).hexdigest() + '"'
