"""A plain batch loop that follows the optimizer: the batch size it polls, telemetry, OOM recovery.

Run the optimizer first (no GPU needed), then the loop:

    .venv/bin/vlm-gpu-optimizer serve --backend simulated &
    .venv/bin/python examples/batch_loop.py --batches 30 --capacity 6

The "model" is fake: it sleeps a little per item and raises the error PyTorch raises
(``CUDA out of memory``) when a batch is larger than ``--capacity`` items, so the OOM path runs
without a GPU. With PyTorch and CUDA, put the real forward pass in ``run_batch``.
"""

from __future__ import annotations

import argparse
import logging
import time

from optimizer.client.follow import BatchSizeClient
from optimizer.client.oom import oom_attempts
from optimizer.client.telemetry import Reporter, measure


class FakeOOM(RuntimeError):
    """What a framework raises when the GPU runs out of memory (same message as PyTorch's)."""


def run_batch(items: list[str], capacity: int, item_s: float) -> list[str]:
    if len(items) > capacity:
        raise FakeOOM(f"CUDA out of memory. Tried to allocate {len(items) * 512} MiB")
    time.sleep(item_s * len(items))
    return [f"caption of {item}" for item in items]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="the optimizer (default: $VLM_OPTIMIZER_URL or http://127.0.0.1:8080)")
    ap.add_argument("--service", default="batch-loop")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--capacity", type=int, default=6, help="the fake model runs out of memory above this")
    ap.add_argument("--item-seconds", type=float, default=0.002)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    queue = [f"image-{i}" for i in range(10_000)]
    done = ooms = 0
    with BatchSizeClient(args.service, url=args.url, interval=1.0, safe_batch_size=1) as client, \
            Reporter(args.service, url=args.url, interval=1.0, sink=client) as reporter:
        for n in range(args.batches):
            size = client.batch_size  # no I/O: the value the background poller keeps current
            # oom_attempts: retry on OOM (empty the cache, then a smaller batch); measure: report each
            # batch, and an OOM as soon as it happens (so only measure gets the reporter)
            for attempt in oom_attempts(size):
                with attempt:
                    batch = queue[done:done + attempt.batch_size]
                    with measure(reporter, attempt.batch_size):
                        run_batch(batch, args.capacity, args.item_seconds)
                    done += len(batch)
                if attempt.strategy != "first":
                    ooms += 1
            print(f"batch {n + 1}: size {size}, processed {done}, OOM retries {ooms}", flush=True)
        reporter.flush()
        print(f"final batch size {client.batch_size} ({client.decision and client.decision['reason']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
