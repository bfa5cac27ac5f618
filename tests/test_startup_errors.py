"""Every start-up error of ``serve`` (and of ``import-config``'s file) is one line on stderr and exit code 2.

``serve`` runs as a real process (``python -m optimizer``) on ports the tests pick and, to make a port
busy, bind and listen on themselves. ``--log-level error`` keeps the info lines of a normal start
off stderr, so what is left is the error alone: exactly one line, ``vlm-gpu-optimizer: ...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from optimizer.gpu.driver import nvidia_driver
from tests.policy_helpers import ROOT

PROG = "vlm-gpu-optimizer: "


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    return {**env, **extra}


def _free_port(*avoid: int) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port this test holds (bound and listening), so that serve cannot bind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optimizer", *args], capture_output=True, text=True, timeout=60,
                          env=env or _env(), cwd=ROOT)


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _run("serve", "--backend", "simulated", "--log-level", "error", *args, env=env)


def assert_one_line(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line, the program's, with every fragment in it; no traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith(PROG), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_read_port_in_use(busy_port: int) -> None:
    done = _serve("--host", "127.0.0.1", "--port", str(busy_port), "--admin-port", str(_free_port(busy_port)))
    assert_one_line(done, f"cannot listen on 127.0.0.1:{busy_port} for the read API", "Address already in use")


def test_admin_port_in_use(busy_port: int) -> None:
    done = _serve("--host", "127.0.0.1", "--port", str(_free_port(busy_port)), "--admin-port", str(busy_port))
    assert_one_line(done, f"cannot listen on 127.0.0.1:{busy_port} for the admin API", "Address already in use")


def test_admin_port_equal_to_the_port_is_refused_before_binding() -> None:
    port = _free_port()
    done = _serve("--host", "127.0.0.1", "--port", str(port), "--admin-port", str(port))
    assert_one_line(done, "server.admin_port: must differ from server.port", str(port))


def test_unresolvable_host() -> None:
    done = _serve("--host", "no-such-host.invalid", "--port", str(_free_port()), "--admin-port", "0")
    assert_one_line(done, "for the read API", "'no-such-host.invalid' does not resolve")


def test_unresolvable_admin_host() -> None:
    # With a token, so that the admin API listens on the address given (not loopback).
    done = _serve("--host", "127.0.0.1", "--port", "0", "--admin-host", "no-such-host.invalid",
                  "--admin-port", str(_free_port()), env=_env(VLM_OPTIMIZER_ADMIN_TOKEN="t0ken"))
    assert_one_line(done, "for the admin API", "'no-such-host.invalid' does not resolve")


def test_explicit_nvml_that_cannot_start() -> None:
    if nvidia_driver() is not None:  # pragma: no cover - only on a GPU host
        pytest.skip("this host has an NVIDIA driver")
    done = _run("serve", "--backend", "nvml", "--port", "0", "--admin-port", "0", "--log-level", "error")
    assert_one_line(done, "GPU backend nvml failed: NVML could not be initialised")


@pytest.mark.parametrize("name", ["deep.yaml", "deep.json"])
def test_deeply_nested_config_file(tmp_path: Path, name: str) -> None:
    cfg = tmp_path / name
    cfg.write_text("strategy: balanced\nprofiles: " + "[" * 20_000 + "]" * 20_000 + "\n" if name.endswith("yaml")
                   else "{\"profiles\": " + "[" * 20_000 + "]" * 20_000 + "}")
    done = _serve("--config", str(cfg), "--port", "0", "--admin-port", "0")
    assert_one_line(done, "invalid configuration", f"{cfg} is nested too deeply")


def test_invalid_read_timeout_names_the_key() -> None:
    done = _serve("--port", "0", "--admin-port", "0", env=_env(VLM_OPTIMIZER_HEADER_TIMEOUT="0"))
    assert_one_line(done, "server.header_timeout", "(0, 3600]")


@pytest.mark.parametrize("name", ["deep.yaml", "deep.json", "deep.conf"])
def test_import_config_with_a_deeply_nested_file(tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    f.write_text("{\"settings\": " + "[" * 20_000 + "]" * 20_000 + "}")
    done = _run("import-config", str(f), "--url", f"http://127.0.0.1:{_free_port()}")  # fails before connecting
    assert_one_line(done, f"{f} is nested too deeply")


def test_simulate_with_a_deeply_nested_scenario(tmp_path: Path) -> None:
    f = tmp_path / "deep.yaml"
    f.write_text("name: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_one_line(_run("simulate", "--scenario", str(f)), f"{f} is nested too deeply")


# -- binding order, as a real process ------------------------------------------------------------------


def test_admin_port_busy_the_read_api_never_answers_ready(busy_port: int) -> None:
    """Both ports are bound before either serves: with the admin port taken, /ready never answered 200."""
    port = _free_port(busy_port)
    answers: list[int] = []
    stop = threading.Event()

    def poll() -> None:  # a probe hammering /ready for as long as the process lives
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    answers.append(r.status)
            except urllib.error.HTTPError as e:
                answers.append(e.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass

    prober = threading.Thread(target=poll, daemon=True)
    prober.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host",
                               "127.0.0.1", "--port", str(port), "--admin-port", str(busy_port), "--log-format",
                               "json", "--monitoring-interval", "0.05"], capture_output=True, text=True,
                              timeout=60, env=_env(), cwd=ROOT)
    finally:
        stop.set()
        prober.join(timeout=10)
    assert 200 not in answers
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == f"{PROG}cannot listen on 127.0.0.1:{busy_port} for the admin API: Address already in use"
    events = [json.loads(line)["event"] for line in lines[:-1]]  # everything else is a JSON log line
    assert "sampler_started" not in events and "listening" not in events and "sampler_ready" not in events


# -- the read timeouts and the auto backend, as a real process ---------------------------------------


def _ready(port: int) -> dict[str, object]:
    """``/ready``'s answer once it is 200, or its last answer after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as r:
                body: dict[str, object] = json.loads(r.read())
                return body
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            if time.monotonic() > deadline:
                return body
        time.sleep(0.05)  # back-off between polls; the synchronisation is /ready itself


def test_serve_applies_the_configured_read_timeouts_and_auto_fails_closed() -> None:
    """``server.header_timeout`` reaches the listener; ``--backend auto`` on this host picks by its driver."""
    port, admin_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "optimizer", "serve", "--backend", "auto", "--host", "127.0.0.1",
                             "--port", str(port), "--admin-port", str(admin_port), "--log-format", "json"],
                            env=_env(VLM_OPTIMIZER_HEADER_TIMEOUT="0.5"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # until it listens (bounded; the synchronisation is the connection itself)
            assert proc.poll() is None, proc.communicate()[1]
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=20)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "serve never listened"
                time.sleep(0.05)
        with conn:
            conn.sendall(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the headers never end
            data = b""
            while chunk := conn.recv(4096):  # until the server closes it (the socket's 20 s timeout bounds this)
                data += chunk
        assert data.startswith(b"HTTP/1.1 408 ")
        ready = _ready(port)
        if nvidia_driver() is None:  # no NVIDIA driver here: none is the right choice, and ready
            assert ready == {"status": "ready", "backend": "none"}
        else:  # pragma: no cover - a GPU host: nvml (ready, or not ready saying why)
            assert ready["backend"] == "nvml"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode in (0, -15), err
    assert '"event": "request_header_timeout"' in err
