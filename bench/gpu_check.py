"""A one-shot check on a machine with an NVIDIA GPU: real NVML, a real PyTorch workload, real OOMs.

In one run of a few minutes:

1. **Sampling.** Opens NVML as ``serve --backend nvml`` does (:class:`optimizer.gpu.nvml.NvmlBackend`)
   and times ``sample()`` over ``--passes`` passes (after 3 untimed ones): one pass reads every GPU,
   so the time per GPU is the pass divided by the GPU count.
2. **The optimizer.** Starts ``vlm-gpu-optimizer serve --backend nvml`` as a subprocess on random
   ports of 127.0.0.1 (the admin token from ``VLM_OPTIMIZER_ADMIN_TOKEN``, a random one, so none is
   written to disk), with a 1 s monitoring and 5 s optimization interval and ``--max-batch-size 4096``
   (the highest allowed, so that memory rather than the cap decides). Its own figures for one pass come
   from ``/metrics`` (``vlm_optimizer_sample_duration_seconds``) and ``/status`` (passes, errors).
3. **Following.** Runs a real PyTorch training step (a ViT-like stack of MLP blocks on random
   ``3 x --image-size²`` images; ``--dim``, ``--depth``) on ``--device`` for ``--follow-seconds``
   through the client: ``BatchSizeClient`` for the published batch, ``measure`` reporting each batch
   (peak and allocator figures) and any OOM at once, ``oom_attempts`` recovering. The published batch
   at the end is the optimizer's answer.
4. **The largest batch that fits**, found by real OOMs and without telling the optimizer: doubling from
   the published batch until a step runs out of memory (``torch.cuda.OutOfMemoryError``, or any error
   :func:`vlm_optimizer_client.oom.is_oom_error` takes for one), then bisection; ``gc.collect()`` and
   ``torch.cuda.empty_cache()`` between tries, ``--steps-per-trial`` steps per try.
5. **The ratio** published / largest: below 1 is headroom the optimizer keeps, above 1 a batch it
   would publish that does not fit.
6. **What the board reports**: every field ``/status`` gives per GPU (MIG, health and whatever else
   the running version has), printed as it comes, none hard-coded.

Output: a table, or ``--json``. Without an NVIDIA GPU (NVML does not start or sees none, or PyTorch has
no CUDA) it prints one line saying so and exits with code 2, having started nothing. Exit code 1: the
check itself failed (the optimizer did not start, ...).

    .venv/bin/python bench/gpu_check.py [--device cuda:0] [--follow-seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "client")):  # run as a script from anywhere, installed or not
    if _path not in sys.path:
        sys.path.insert(0, _path)

from optimizer.logs import configure_logging  # noqa: E402
from vlm_optimizer_client import BatchSizeClient, Reporter, gpu_identity, is_oom_error, measure, oom_attempts  # noqa: E402

NO_GPU_EXIT = 2
SERVICE = "gpu-check"
OPTIMIZER_MAX_BATCH = 4096  # the configuration's upper bound for max_batch_size


class NoGpu(Exception):
    """This machine cannot run the check: the one-line reason."""


# --------------------------------------------------------------------------- preconditions


def open_nvml(nvml: ModuleType | None = None) -> Any:
    """The NVML backend, or :class:`NoGpu` when NVML does not start or sees no GPU."""
    from optimizer.gpu.nvml import NvmlBackend
    from optimizer.gpu.types import BackendError

    try:
        backend = NvmlBackend(nvml=nvml)
    except BackendError as exc:
        raise NoGpu(str(exc)) from None
    if backend.device_count == 0:
        backend.close()
        raise NoGpu("NVML started but sees no GPU")
    return backend


def cuda_torch(device: str) -> ModuleType:
    """PyTorch with CUDA and ``device`` on it, or :class:`NoGpu`."""
    try:
        import torch
    except ImportError:
        raise NoGpu("PyTorch is not installed (install a CUDA build of torch)") from None
    if not torch.cuda.is_available():
        raise NoGpu(f"PyTorch {torch.__version__} sees no CUDA device (a CPU build, or no driver/device visible)")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise NoGpu(f"--device {device!r}: {exc}") from None
    index = dev.index if dev.index is not None else 0
    if dev.type != "cuda" or index >= torch.cuda.device_count():
        raise NoGpu(f"--device {device!r} is not one of PyTorch's {torch.cuda.device_count()} CUDA devices")
    return torch


# --------------------------------------------------------------------------- 1. sampling


@dataclass
class SamplingCost:
    gpus: int
    passes: int
    pass_ms_median: float
    pass_ms_p95: float
    per_gpu_ms: float
    failed_gpus: list[int] = field(default_factory=list)


def time_sampling(backend: Any, passes: int, warmup: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> SamplingCost:
    """Time ``backend.sample()``: the median and 95th percentile of ``passes`` passes, and per GPU."""
    for _ in range(warmup):
        backend.sample(time.time())
    times: list[float] = []
    failed: set[int] = set()
    for _ in range(passes):
        start = clock()
        samples = backend.sample(time.time())
        times.append((clock() - start) * 1000)
        failed.update(s.index for s in samples if s.failed)
    times.sort()
    gpus = backend.device_count
    median = statistics.median(times)
    p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
    return SamplingCost(gpus, passes, round(median, 3), round(p95, 3), round(median / gpus, 3), sorted(failed))


# --------------------------------------------------------------------------- 2. the optimizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Optimizer:
    """``serve --backend nvml`` in a subprocess, on random ports; a context manager."""

    def __init__(self, backend: str = "nvml", startup_s: float = 60.0) -> None:
        self.backend = backend  # nvml; the tests run the rest of the check on the simulated one
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s = startup_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Optimizer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
        env["VLM_OPTIMIZER_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "optimizer", "serve", "--backend", self.backend, "--host", "127.0.0.1",
               "--port", str(self.port), "--admin-port", str(self.admin_port), "--monitoring-interval", "1",
               "--optimization-interval", "5", "--max-batch-size", str(OPTIMIZER_MAX_BATCH), "--log-level",
               "warning"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.startup_s
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"the optimizer exited with code {self.proc.returncode}: {err.strip()[-500:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the optimizer was not ready within {self.startup_s:g} s")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body: bytes = r.read()
            return body

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.get("/status"))
        return body

    def mean_pass_ms(self) -> float | None:
        """The optimizer's own mean sampling pass, from ``/metrics``."""
        text = self.get("/metrics").decode()
        total = re.search(r"^vlm_optimizer_sample_duration_seconds_sum\s+(\S+)", text, re.M)
        count = re.search(r"^vlm_optimizer_sample_duration_seconds_count\s+(\S+)", text, re.M)
        if not total or not count or float(count.group(1)) == 0:
            return None
        return round(float(total.group(1)) / float(count.group(1)) * 1000, 3)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted keys; lists and scalars as they are (for the table)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


# --------------------------------------------------------------------------- 3-4. the workload


class Workload:
    """A ViT-like training step: patches of random images, ``depth`` MLP blocks of width ``dim``."""

    def __init__(self, torch: ModuleType, device: str, image_size: int, dim: int, depth: int,
                 patch: int = 16) -> None:
        nn = torch.nn
        self.torch, self.device, self.image_size, self.patch = torch, torch.device(device), image_size, patch

        class Residual(nn.Module):  # type: ignore[misc,name-defined]
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Any) -> Any:
                return x + self.inner(x)

        blocks = [Residual(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                         nn.Linear(4 * dim, dim))) for _ in range(depth)]
        self.net = nn.Sequential(nn.Linear(3 * patch * patch, dim), *blocks, nn.LayerNorm(dim)).to(self.device)
        self.head = nn.Linear(dim, 10).to(self.device)
        self.params = list(self.net.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.SGD(self.params, lr=1e-3)
        torch.backends.cuda.matmul.allow_tf32 = True

    def step(self, batch_size: int) -> None:
        torch, p, s = self.torch, self.patch, self.image_size
        self.opt.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients
        images = torch.rand(batch_size, 3, s, s, device=self.device)
        tokens = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(batch_size, -1, 3 * p * p)
        loss = torch.nn.functional.cross_entropy(self.head(self.net(tokens).mean(dim=1)),
                                                 torch.randint(0, 10, (batch_size,), device=self.device))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # an OOM surfaces here, inside the trial


@dataclass
class Trial:
    batch_size: int
    fits: bool
    seconds: float
    error: str | None = None  # the OOM's class and first line when it did not fit


def try_batch(step: Callable[[int], None], batch_size: int, steps: int, cleanup: Callable[[], None],
              clock: Callable[[], float] = time.perf_counter) -> Trial:
    """Run ``steps`` steps at ``batch_size``: fits unless one runs out of memory (any other error
    propagates). ``cleanup`` runs after, once the OOM and the frames holding its tensors are gone."""
    start, error = clock(), None
    try:
        for _ in range(steps):
            step(batch_size)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    seconds = round(clock() - start, 3)
    cleanup()
    return Trial(batch_size, error is None, seconds, error)


def largest_batch(fits: Callable[[int], Trial], start: int, limit: int) -> tuple[int, list[Trial]]:
    """The largest batch in ``[1, limit]`` that fits: doubling from ``start``, then bisection between the
    last that fitted and the first that did not. 0 when even 1 does not fit."""
    trials: list[Trial] = []

    def run(b: int) -> bool:
        t = fits(b)
        trials.append(t)
        return t.fits

    lo, hi = 0, None  # lo fits (0: nothing known), hi does not
    b = max(1, min(start, limit))
    while True:
        if run(b):
            lo = b
            if b >= limit:
                return lo, trials
            b = min(b * 2, limit)
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def cuda_cleanup(torch: ModuleType) -> Callable[[], None]:
    def cleanup() -> None:
        gc.collect()
        torch.cuda.empty_cache()

    return cleanup


@dataclass
class Following:
    published_batch: int
    optimal_batch_size: int | None
    reason: str | None
    published_history: list[int]
    batches: int
    ooms: int
    peak_bytes: int | None
    gpu_named: bool  # the service named its GPU by torch's UUID (else the optimizer chose)
    exhausted: int = 0  # batches whose every attempt ran out of memory


def first_decision(client: BatchSizeClient, timeout: float = 10.0) -> bool:
    """Wait for the poller's first answer (it polls at once); False when none came."""
    deadline = time.monotonic() + timeout
    while client.decision is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return client.decision is not None


def follow(workload: Workload, url: str, gpu: str | None, seconds: float,
           device: str) -> Following:
    """Run the workload at the published batch for ``seconds``, reporting every batch.

    The GPU is named by the UUID PyTorch gives; when the optimizer does not answer for it (a version
    that does not know that UUID, say a MIG instance), the service names none and the optimizer chooses.
    """
    torch = workload.torch
    if gpu is not None:
        with BatchSizeClient(SERVICE, url=url, gpu=gpu, interval=1.0, safe_batch_size=1) as probe:
            if not first_decision(probe):
                gpu = None
    client = BatchSizeClient(SERVICE, url=url, gpu=gpu, interval=1.0, safe_batch_size=1)
    history: list[int] = []
    batches = ooms = exhausted = 0
    peak: int | None = None
    with client, Reporter(SERVICE, url=url, gpu=gpu, interval=1.0, sink=client) as reporter:
        if not first_decision(client):
            raise RuntimeError(f"the optimizer did not answer GET /batch-size: {client.last_error}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            size = client.batch_size
            if not history or history[-1] != size:
                history.append(size)
            try:
                for attempt in oom_attempts(size, device):
                    with attempt:
                        with measure(reporter, attempt.batch_size, attempt.device):
                            workload.step(attempt.batch_size)
                        if attempt.batch_size == size:  # measure reset the peak before the batch
                            peak = int(torch.cuda.max_memory_allocated(device))
                    if attempt.strategy != "first":
                        ooms += 1
            except Exception as exc:  # every attempt ran out of memory: reported; the next batch is smaller
                if not is_oom_error(exc):
                    raise
                ooms += 1
                exhausted += 1
            batches += 1
        reporter.flush()
        decision = client.decision or {}
        published = client.batch_size
    return Following(published, decision.get("optimal_batch_size"), decision.get("reason"), history, batches, ooms,
                     peak, gpu is not None, exhausted)


# --------------------------------------------------------------------------- the report


@dataclass
class Result:
    torch: str
    cuda: str | None
    device: str
    gpu: str | None
    sampling: SamplingCost
    optimizer_pass_ms: float | None
    optimizer_samples: int | None
    optimizer_sample_errors: int | None
    following: Following
    largest_batch: int
    trials: list[Trial]
    ratio: float | None
    capped: bool
    status_gpus: list[dict[str, Any]]
    model: dict[str, int]
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(r: Result) -> str:
    s, f = r.sampling, r.following
    lines = [f"GPU check: torch {r.torch} (CUDA {r.cuda}) on {r.device} ({r.gpu or 'no UUID from torch'}), "
             f"{r.elapsed_s:.0f} s", "", "Sampling (real NVML)"]
    lines.append(table([
        ("measure", "value"),
        ("GPUs", str(s.gpus)),
        (f"one pass, median of {s.passes}", f"{s.pass_ms_median:.3f} ms"),
        ("one pass, p95", f"{s.pass_ms_p95:.3f} ms"),
        ("per GPU (median / GPUs)", f"{s.per_gpu_ms:.3f} ms"),
        ("failed GPUs", ", ".join(map(str, s.failed_gpus)) or "none"),
        ("optimizer's mean pass (/metrics)", "-" if r.optimizer_pass_ms is None else f"{r.optimizer_pass_ms:.3f} ms"),
        ("optimizer's passes / errors (/status)", f"{r.optimizer_samples} / {r.optimizer_sample_errors}"),
    ]))
    lines += ["", f"Batch size (model: {', '.join(f'{k} {v}' for k, v in r.model.items())})"]
    lines.append(table([
        ("measure", "value"),
        ("published by the optimizer", str(f.published_batch) + (" (its max_batch_size)" if r.capped else "")),
        ("published over the run", " -> ".join(map(str, f.published_history))),
        ("the service named its GPU", "yes, by torch's UUID" if f.gpu_named else "no: the optimizer chose"),
        ("batches run / OOM retries / batches lost to OOMs", f"{f.batches} / {f.ooms} / {f.exhausted}"),
        ("peak allocated at the published batch", "-" if f.peak_bytes is None else f"{f.peak_bytes / 2**30:.2f} GiB"),
        ("largest batch that fits (real OOMs)", str(r.largest_batch)),
        ("trials (batch: fits)", ", ".join(f"{t.batch_size}:{'y' if t.fits else 'n'}" for t in r.trials)),
        ("ratio published / largest", "-" if r.ratio is None else f"{r.ratio:.3f}"),
    ]))
    if f.reason:
        lines.append(f"optimizer's reason: {f.reason}")
    ooms = sorted({t.error.split(":")[0] for t in r.trials if t.error})
    if ooms:
        lines.append(f"OOM errors seen: {', '.join(ooms)}")
    if r.status_gpus:
        flat = [flatten(g) for g in r.status_gpus]
        keys = list(dict.fromkeys(k for g in flat for k in g))
        header = ("field (/status)", *(f"GPU {g.get('index', i)}" for i, g in enumerate(flat)))
        rows = [header] + [(k, *(_cell(g.get(k, "")) for g in flat)) for k in keys]
        lines += ["", "What the board reports (every field of /status per GPU)", table(rows)]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", default="cuda:0", help="the CUDA device of the workload (default: cuda:0)")
    ap.add_argument("--passes", type=int, default=50, help="timed NVML sampling passes (default: 50)")
    ap.add_argument("--follow-seconds", type=float, default=60.0,
                    help="how long the workload follows the published batch (default: 60)")
    ap.add_argument("--steps-per-trial", type=int, default=2, help="steps per batch size tried (default: 2)")
    ap.add_argument("--max-batch", type=int, default=1 << 16, help="the search's upper bound (default: 65536)")
    ap.add_argument("--image-size", type=int, default=224, help="the images' side in pixels, a multiple of 16")
    ap.add_argument("--dim", type=int, default=768, help="the blocks' width (default: 768)")
    ap.add_argument("--depth", type=int, default=12, help="MLP blocks (default: 12)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    for name in ("passes", "steps_per_trial", "max_batch", "dim", "depth"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 16 or args.image_size % 16:
        ap.error(f"--image-size must be a multiple of 16, got {args.image_size}")
    if not args.follow_seconds > 0:
        ap.error(f"--follow-seconds must be > 0, got {args.follow_seconds}")
    return args


def run(args: argparse.Namespace, nvml: ModuleType | None = None, optimizer_backend: str = "nvml") -> Result:
    """The check; :class:`NoGpu` before anything starts when this machine cannot run it.

    ``nvml`` and ``optimizer_backend`` are for the tests (a fake ``pynvml``, a simulated optimizer)."""
    began = time.monotonic()
    backend = open_nvml(nvml)
    try:
        torch = cuda_torch(args.device)
        sampling = time_sampling(backend, args.passes)
    finally:
        backend.close()
    index = torch.device(args.device).index
    device = f"cuda:{0 if index is None else index}"  # "cuda" alone: set_device needs the index
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)  # initialises CUDA: the client reads the device's UUID from then on
    gpu = gpu_identity()
    workload = Workload(torch, device, args.image_size, args.dim, args.depth)
    with Optimizer(optimizer_backend) as opt:
        following = follow(workload, opt.url, gpu, args.follow_seconds, device)
        status = opt.status()
        pass_ms = opt.mean_pass_ms()
        largest, trials = largest_batch(
            lambda b: try_batch(workload.step, b, args.steps_per_trial, cuda_cleanup(torch)),
            following.published_batch, args.max_batch)
        status_gpus = opt.status().get("gpus", [])
    return Result(
        torch=torch.__version__, cuda=torch.version.cuda, device=device, gpu=gpu, sampling=sampling,
        optimizer_pass_ms=pass_ms, optimizer_samples=status.get("samples"),
        optimizer_sample_errors=status.get("sample_errors"), following=following, largest_batch=largest,
        trials=trials, ratio=round(following.published_batch / largest, 4) if largest else None,
        capped=following.published_batch >= OPTIMIZER_MAX_BATCH, status_gpus=status_gpus,
        model={"image_size": args.image_size, "dim": args.dim, "depth": args.depth},
        elapsed_s=round(time.monotonic() - began, 1))


def main(argv: list[str] | None = None, nvml: ModuleType | None = None) -> int:
    args = parse_args(argv)
    configure_logging("auto", "warning")  # the backend's info lines would mix into the report
    logging.getLogger("vlm_optimizer_client").setLevel(logging.ERROR)  # each OOM retry is counted in the report
    try:
        result = run(args, nvml)
    except NoGpu as exc:
        print(f"gpu_check: no NVIDIA GPU to check here: {exc}", file=sys.stderr)
        return NO_GPU_EXIT
    except RuntimeError as exc:
        print(f"gpu_check: failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
