"""The client library VLM services use to follow the optimizer (``optimizer.client``).

It imports nothing of the server (no pynvml, kubernetes or prometheus_client) and uses PyTorch only
when it is installed. Its pieces, each in its own module:

- :mod:`optimizer.client.follow`: follow ``GET /batch-size`` (a sync and an async client);
- :mod:`optimizer.client.telemetry`: measure batches and report them (``POST /reports``);
- :mod:`optimizer.client.oom`: survive CUDA out-of-memory errors (decorator and retry loop);
- :mod:`optimizer.client.admission`: VRAM admission checks, worker counts, concurrency limits.
"""
