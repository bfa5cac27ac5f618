"""The examples run against a real optimizer: the batch loop as a process next to `serve --backend
simulated`, the aiohttp service in process next to an optimizer app on an ephemeral port."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from client_fakes import wait_until_ready
from optimizer.api.app import build_app
from vlm_optimizer_client import VRAMProfiles
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend
from tests.policy_helpers import ROOT
from tests.test_cli import _free_port
from tests.tools import require_module


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def optimizer_process() -> Iterator[str]:
    port, admin = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    proc = subprocess.Popen([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host",
                             "127.0.0.1", "--port", str(port), "--admin-port", str(admin), "--monitoring-interval",
                             "0.5", "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_batch_loop_follows_the_optimizer_and_survives_ooms(optimizer_process: str) -> None:
    # The fake model runs out of memory above 3 items; the optimizer starts the service at 4.
    done = subprocess.run([sys.executable, "examples/batch_loop.py", "--url", optimizer_process, "--batches", "40",
                           "--capacity", "3", "--item-seconds", "0.01"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    retries = [int(m) for m in re.findall(r"OOM retries (\d+)", done.stdout)]
    assert retries[-1] >= 1, done.stdout  # the OOM happened and was recovered locally
    final = int(re.findall(r"final batch size (\d+)", done.stdout)[0])
    assert final <= 3  # the OOM report made the optimizer lower the batch for good
    with urllib.request.urlopen(optimizer_process + "/batch-size?service=batch-loop", timeout=5) as r:
        decision = json.loads(r.read())
    assert decision["batch_size"] <= 3 and "OOM" in decision["reason"]


async def test_the_service_example_end_to_end(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
                                              tmp_path: Path) -> None:
    engine = Engine(Settings())
    # 40 of 80 GiB in use: memory the fake model's OOM could have run out of (not contradicted by the sample)
    sampler = Sampler(ScriptedBackend(1, used=40 * 1024**3), engine, clock=FakeClock())
    await sampler.tick()
    optimizer: TestServer = await aiohttp_server(build_app(engine, sampler, run_sampler=False))
    example = load_example("vlm_service")
    app = example.build_app(str(optimizer.make_url("")).rstrip("/"), capacity=3, cache_dir=tmp_path)
    client = await aiohttp_client(app)
    await app[example.FOLLOWER].poll_once()
    assert app[example.FOLLOWER].batch_size == 4  # the optimizer's default batch for a new service

    r = await client.post("/caption", json={"images": [f"img{i}" for i in range(10)]})
    assert r.status == 200
    body = await r.json()
    assert len(body["captions"]) == 10  # recovered from the OOM at 4 and finished at a smaller batch
    await app[example.REPORTER].flush()
    svc = engine.state.services[(0, "vlm-example")]
    assert svc.last_oom_at is not None and svc.batch_size < 4  # the OOM was reported and acted on
    assert app[example.FOLLOWER].batch_size == svc.batch_size  # the reply reached the follower at once

    hw = await (await client.get("/hw")).json()
    assert "MB total" in hw["hw"] and "Test GPU" in hw["hw"]
    assert (await (await client.get("/workers")).json())["workers"] >= 1

    # A request the GPU has no room for is refused with 503 and Retry-After, not crashed on.
    VRAMProfiles("vlm-example", cache_dir=tmp_path).record({"task": "caption", "images": 2}, 79 * 1024**3)
    r = await client.post("/caption", json={"images": ["a", "b"]})
    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1


def test_the_batch_loop_runs_a_real_pytorch_model_through_the_client(optimizer_process: str) -> None:
    """--model torch: a real conv net on the CPU under a budget of 3 images; the budget's real
    torch.cuda.OutOfMemoryError at the optimizer's 4 is recovered locally and reported."""
    torch = require_module("torch")
    done = subprocess.run([sys.executable, "examples/batch_loop.py", "--url", optimizer_process, "--batches", "30",
                           "--capacity", "3", "--model", "torch", "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"torch {torch.__version__} on cpu, budget " in done.stdout
    retries = [int(m) for m in re.findall(r"OOM retries (\d+)", done.stdout)]
    assert len(retries) == 30 and retries[-1] >= 1, done.stdout
    processed = int(re.findall(r"processed (\d+)", done.stdout)[-1])
    assert processed >= 30  # every batch finished, on the retry when it ran out of memory
    assert "oom_recovery_exhausted" not in done.stderr and "Traceback" not in done.stderr
    with urllib.request.urlopen(optimizer_process + "/batch-size?service=batch-loop", timeout=5) as r:
        decision = json.loads(r.read())
    assert decision["batch_size"] <= 3 and "OOM reported at batch 4" in decision["reason"]
