"""A plain batch loop that follows the optimizer: the batch size it polls, telemetry, OOM recovery.

Run the optimizer first (no GPU needed), then the loop:

    .venv/bin/vlm-gpu-optimizer serve --backend simulated &
    .venv/bin/python examples/batch_loop.py --batches 30 --capacity 6

The default "model" is fake: it sleeps a little per item and raises the error PyTorch raises
(``CUDA out of memory``) when a batch is larger than ``--capacity`` items, so the OOM path runs
without a GPU.

``--model torch`` runs a small real PyTorch conv net on random image-like tensors (``--image-size``)
instead; PyTorch must be installed (the dev extras install the CPU build):

    .venv/bin/python examples/batch_loop.py --model torch --batches 30 --capacity 3

On ``--device cpu`` (the default without CUDA) the CPU stands in for a GPU: a forward hook adds up
the bytes of the activations of each batch and raises PyTorch's real ``torch.cuda.OutOfMemoryError``
once they pass ``--capacity`` images' worth, in the middle of the forward pass as a GPU would; the
client is not told the device (``device=None``), so it reports and recovers as it would on the GPU.
On ``--device cuda`` the GPU's own memory decides (``--capacity`` is not used), and ``measure``
reports the allocator's peak and figures.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

from vlm_optimizer_client import BatchSizeClient, Reporter, measure, oom_attempts


class FakeOOM(RuntimeError):
    """What a framework raises when the GPU runs out of memory (same message as PyTorch's)."""


def run_batch(items: list[str], capacity: int, item_s: float) -> list[str]:
    if len(items) > capacity:
        raise FakeOOM(f"CUDA out of memory. Tried to allocate {len(items) * 512} MiB")
    time.sleep(item_s * len(items))
    return [f"caption of {item}" for item in items]


class TorchModel:
    """A tiny conv net on random ``3 x size x size`` images, under a memory budget on the CPU."""

    def __init__(self, torch: Any, device: str, capacity: int, size: int) -> None:
        nn = torch.nn
        self.torch, self.device, self.size = torch, torch.device(device), size
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(self.device)
        self.net.eval()
        self.budget: int | None = None
        self.used = 0
        if self.device.type == "cpu":
            for layer in self.net:
                layer.register_forward_hook(self._account)
            self.run(1)  # one image's activations, measured
            self.budget = capacity * self.used

    def _account(self, module: Any, inputs: Any, output: Any) -> None:
        self.used += output.nelement() * output.element_size()
        if self.budget is not None and self.used > self.budget:
            raise self.torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {output.nelement() * output.element_size()} bytes "
                f"(the CPU's stand-in budget: {self.budget} bytes)")

    def run(self, batch_size: int) -> list[int]:
        self.used = 0
        with self.torch.inference_mode():
            images = self.torch.rand(batch_size, 3, self.size, self.size, device=self.device)
            return [int(c) for c in self.net(images).argmax(dim=1).tolist()]

    @property
    def client_device(self) -> str | None:
        """What the client is told: the CUDA device, or nothing for the CPU standing in for one."""
        return None if self.device.type == "cpu" else str(self.device)


def make_runner(args: argparse.Namespace) -> tuple[Callable[[list[str]], object], str | None]:
    """The batch function and the device the client measures, for ``--model``."""
    if args.model == "fake":
        return (lambda items: run_batch(items, args.capacity, args.item_seconds)), None
    import torch  # only for --model torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TorchModel(torch, device, args.capacity, args.image_size)
    print(f"torch {torch.__version__} on {device}"
          + (f", budget {model.budget} bytes ({args.capacity} images)" if model.budget is not None else ""), flush=True)
    return (lambda items: model.run(len(items))), model.client_device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="the optimizer (default: $VLM_OPTIMIZER_URL or http://127.0.0.1:8080)")
    ap.add_argument("--service", default="batch-loop")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--capacity", type=int, default=6,
                    help="the model runs out of memory above this many items (on the CPU; not used on CUDA)")
    ap.add_argument("--item-seconds", type=float, default=0.002, help="the fake model's time per item")
    ap.add_argument("--model", choices=("fake", "torch"), default="fake",
                    help="fake (no dependency) or torch (a small real conv net; needs PyTorch)")
    ap.add_argument("--device", default=None, help="--model torch: cpu or cuda[:N] (default: cuda when available)")
    ap.add_argument("--image-size", type=int, default=32, help="--model torch: the images' side, in pixels")
    args = ap.parse_args(argv)
    if args.capacity < 1 or args.image_size < 4:
        ap.error("--capacity must be >= 1 and --image-size >= 4")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    run, device = make_runner(args)
    queue = [f"image-{i}" for i in range(10_000)]
    done = ooms = 0
    with BatchSizeClient(args.service, url=args.url, interval=1.0, safe_batch_size=1) as client, \
            Reporter(args.service, url=args.url, interval=1.0, sink=client) as reporter:
        for n in range(args.batches):
            size = client.batch_size  # no I/O: the value the background poller keeps current
            # oom_attempts: retry on OOM (empty the cache, then a smaller batch); measure: report each
            # batch, and an OOM as soon as it happens (so only measure gets the reporter)
            for attempt in oom_attempts(size, device):
                with attempt:
                    batch = queue[done:done + attempt.batch_size]
                    with measure(reporter, attempt.batch_size, attempt.device):
                        run(batch)
                    done += len(batch)
                if attempt.strategy != "first":
                    ooms += 1
            print(f"batch {n + 1}: size {size}, processed {done}, OOM retries {ooms}", flush=True)
        reporter.flush()
        print(f"final batch size {client.batch_size} ({client.decision and client.decision['reason']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
