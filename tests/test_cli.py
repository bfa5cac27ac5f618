"""The command line: simulate's output, clear errors, and serve as a real process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from optimizer.cli import main
from optimizer.config import ServerSettings, Settings, load_config
from optimizer.simulation.run import MEASURES
from tests.policy_helpers import ROOT

STEADY = str(ROOT / "examples/scenarios/steady-h100.yaml")


def test_simulate_prints_a_table_with_every_measure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--scenario", STEADY, "--duration", "600"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header == ["gpu", "service", *MEASURES]
    assert out.splitlines()[2].split()[:2] == ["0", "vlm"]
    assert out.splitlines()[-1].startswith("GPU 0: 0 co-tenant arrivals failed")


def test_simulate_json_has_an_object_per_service(capsys: pytest.CaptureFixture[str]) -> None:
    two = str(ROOT / "examples/scenarios/two-services.yaml")
    assert main(["simulate", "--scenario", two, "--strategy", "conservative", "--json", "--duration", "900"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "conservative"
    assert set(data["gpus"]) == {"0"}
    assert data["gpus"]["0"]["cotenant_failures"] == 0
    assert set(data["gpus"]["0"]["services"]) == {"captioner", "vqa"}
    for measures in data["gpus"]["0"]["services"].values():
        assert set(MEASURES) <= set(measures)
        assert 0 < measures["ratio"] <= 1
        assert measures["ooms"] == 0


def test_simulate_json_keeps_one_name_on_two_gpus_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sc = tmp_path / "two-gpus.yaml"
    sc.write_text("name: two-gpus\nduration_s: 300\ngpus:\n  - {index: 0, total_mb: 81559}\n"
                  "  - {index: 1, total_mb: 24564}\nservices:\n"
                  "  - {name: vlm, gpu: 0, base_mb: 18000, per_item_mb: 3200, item_ms: 45}\n"
                  "  - {name: vlm, gpu: 1, base_mb: 7000, per_item_mb: 1100, item_ms: 35}\n")
    assert main(["simulate", "--scenario", str(sc), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    big, small = data["gpus"]["0"]["services"]["vlm"], data["gpus"]["1"]["services"]["vlm"]
    assert big["gpu"] == 0 and small["gpu"] == 1
    assert big["safe_oracle_items"] != small["safe_oracle_items"]  # two services, not one counted twice


def test_simulate_takes_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: aggressive\nmonitoring_interval: 2\noptimization_interval: 30\n")
    assert main(["simulate", "--scenario", STEADY, "--config", str(cfg), "--json", "--duration", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "aggressive"


def test_invalid_config_is_one_clear_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: turbo\n")
    assert main(["simulate", "--scenario", STEADY, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "strategy" in err and "conservative, balanced, aggressive, adaptive" in err
    assert "Traceback" not in err
    assert main(["serve", "--config", str(cfg)]) == 2


def test_invalid_scenario_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sc = tmp_path / "s.yaml"
    sc.write_text("name: x\nduration_s: 60\ngpus: [{total_mb: 1000}]\n"
                  "services: [{name: a, base_mb: 1, per_item_mb: -5, item_ms: 1}]\n")
    assert main(["simulate", "--scenario", str(sc)]) == 2
    assert "services[0].per_item_mb" in capsys.readouterr().err


def test_scenario_needs_the_simulated_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--backend", "none", "--scenario", STEADY]) == 2
    assert "--backend simulated" in capsys.readouterr().err


def test_the_example_config_is_every_key_at_its_default() -> None:
    cfg = load_config(ROOT / "examples/config.yaml", environ={})
    assert cfg.settings == Settings()
    assert cfg.server == ServerSettings()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    return subprocess.run([sys.executable, "-m", "optimizer", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)


def test_python_m_optimizer_help_lists_the_commands() -> None:
    done = _run("--help")
    assert done.returncode == 0
    assert "serve" in done.stdout and "simulate" in done.stdout
    for sub in ("serve", "simulate"):
        assert _run(sub, "--help").returncode == 0


def test_explicit_nvml_without_a_driver_is_a_clear_error() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - only on a machine with an NVIDIA driver
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")
    done = _run("serve", "--backend", "nvml", "--port", "0", "--admin-port", "0", "--log-level", "error")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line
    assert done.stderr.startswith("vlm-gpu-optimizer: GPU backend nvml failed: NVML could not be initialised")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``serve --backend simulated`` as a real process on free local ports (the read API's and the admin
    API's: never 8080/8081, which a developer's ``make serve`` may hold), its generated admin token kept in
    the test's own runtime directory."""
    port = _free_port()
    admin_port = _free_port()
    while admin_port == port:
        admin_port = _free_port()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    env["XDG_RUNTIME_DIR"] = str(run)
    proc = subprocess.Popen([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host",
                             "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
                             "--monitoring-interval", "0.2", "--log-format", "json"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode in (0, -15), err
        assert '"event": "sampler_stopped"' in err
        assert f'"admin": "127.0.0.1:{admin_port}"' in err  # the admin API was on the port given, not 8081


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_simulated_answers_over_http(served: str) -> None:
    deadline = time.monotonic() + 30
    while True:  # poll until the process listens and has taken its first sample (bounded)
        try:
            status, _ = _get(served + "/ready")
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "serve never became ready"
        time.sleep(0.05)  # back-off between polls; the synchronisation is /ready itself
    status, body = _get(served + "/batch-size?service=vlm")
    assert status == 200
    assert body["service"] == "vlm" and isinstance(body["batch_size"], int)
    gpu = body["gpu"]
    assert isinstance(gpu, dict) and "H100" in str(gpu["name"])
    status, health = _get(served + "/health")
    assert status == 200 and health["status"] == "ok"
    status, err = _get(served + "/batch-size?service=vlm&gpu=7")
    assert status == 400 and err["parameter"] == "gpu"
