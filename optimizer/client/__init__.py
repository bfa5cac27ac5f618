"""The client library VLM services use to follow the optimizer (``optimizer.client``).

It imports nothing of the server (no pynvml, kubernetes, prometheus_client or structlog) and uses
PyTorch only when the service has loaded it. Its pieces, each in its own module (docs/client.md):

- :mod:`optimizer.client.follow`: follow ``GET /batch-size`` (``BatchSizeClient``, ``AsyncBatchSizeClient``);
- :mod:`optimizer.client.telemetry`: measure batches and report them (``Reporter``, ``AsyncReporter``, ``measure``);
- :mod:`optimizer.client.oom`: survive CUDA out-of-memory errors (``recover_oom``, ``oom_attempts``);
- :mod:`optimizer.client.admission`: VRAM admission, worker counts, hardware summary, concurrency limits.
"""
