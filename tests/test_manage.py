"""The management commands (``vlm-gpu-optimizer status``, ``monitor``, ...) against a real admin API.

Each test serves the admin API on an ephemeral port (pytest-aiohttp's ``aiohttp_server``), drives
sampling by hand on a fake clock with a scripted backend, and runs the CLI's ``main`` in a worker
thread (its HTTP client blocks), capturing what it prints. What the server did is checked on the
engine and sampler themselves. Logs are captured (``capture_logs``), so stdout holds only the CLI's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs
from structlog.typing import EventDict

from optimizer import manage
from optimizer.api import build_app
from optimizer.api.admin import EXPORT_FORMAT, build_admin_app
from optimizer.cli import build_parser, main
from optimizer.config import SETTING_KEYS, Settings, Strategy, settings_to_dict
from optimizer.engine import Engine
from optimizer.persistence import Persister, StateFile
from optimizer.sampler import Sampler
from optimizer.policy.operator import clock_text
from tests.fakes import FakeClock, ScriptedBackend, no_sleep, uuid_of
from tests.policy_helpers import ROOT

GIB = 1024**3
TOKEN = "s3cret-token"
# 1 GiB per item, room up to 64: an optimization has something to change
SETTINGS = Settings(max_batch_size=64, default_profile=dataclasses.replace(Settings().default_profile,
                                                                           per_item_mb=1024))
ONE_LINE = re.compile(r"vlm-gpu-optimizer: [^\n]+\n")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def failed_with(self, code: int) -> str:
        """Assert a failure: exit ``code``, nothing on stdout, ONE ``vlm-gpu-optimizer: `` line on stderr."""
        assert self.code == code, (self.code, self.out, self.err)
        assert self.out == ""
        assert ONE_LINE.fullmatch(self.err), self.err
        assert "Traceback" not in self.err
        return self.err


@dataclass
class Service:
    """A served admin API over an engine and a sampler that the test ticks."""

    url: str
    engine: Engine
    sampler: Sampler
    backend: ScriptedBackend
    clock: FakeClock
    capsys: pytest.CaptureFixture[str]
    logs: list[EventDict]
    sleeps: list[float] = field(default_factory=list)

    async def tick(self, advance: float = 5.0) -> None:
        if self.sampler.stats.samples:
            self.clock.advance(advance)
        assert await self.sampler.tick() is not None

    async def run(self, *argv: str, url: str | None = None, token: str | None = TOKEN,
                  sleep: Callable[[float], None] | None = None) -> Result:
        """``vlm-gpu-optimizer ARGV --url URL --token TOKEN`` in a worker thread."""
        args = [*argv, "--url", url or self.url]
        if token is not None:
            args += ["--token", token]
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, args, sleep=sleep or self.no_sleep)
        cap = self.capsys.readouterr()
        return Result(code, cap.out, cap.err)

    def no_sleep(self, seconds: float) -> None:
        raise AssertionError(f"only monitor waits (asked for {seconds} s)")

    def audits(self) -> list[str]:
        return [e["action"] for e in self.logs if e.get("event") == "admin_audit"]

    def override(self, service: str = "vlm", gpu: int = 0) -> int | None:
        return self.engine.state.services[(gpu, service)].override


PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No admin URL, token, state path or proxy from the environment, and an empty private runtime
    directory (where a generated token would be looked for); returns that directory."""
    for name in (manage.URL_ENV, manage.TOKEN_ENV, manage.STATE_PATH_ENV, "no_proxy", "NO_PROXY", *PROXY_ENV):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path_factory.mktemp("run")
    run.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
async def svc(aiohttp_server: AiohttpServer, capsys: pytest.CaptureFixture[str],
              logs: list[EventDict]) -> AsyncIterator[Service]:
    clock = FakeClock()
    backend = ScriptedBackend(2)
    engine = Engine(SETTINGS)
    sampler = Sampler(backend, engine, clock=clock, sleep=no_sleep)
    admin = build_admin_app(build_app(engine, sampler, run_sampler=False), TOKEN.encode())
    server = await aiohttp_server(admin)
    s = Service(f"http://{server.host}:{server.port}", engine, sampler, backend, clock, capsys, logs)
    engine.poll("vlm", 0, clock())
    for _ in range(3):
        await s.tick()
    yield s


def free_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- status


async def test_status_shows_every_gpu_and_service(svc: Service) -> None:
    svc.engine.poll("captioner", 1, svc.clock())
    r = await svc.run("status")
    assert r.code == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0] == "optimizer: backend scripted, monitoring on, ready, healthy, 3 samples, 0 errors"
    assert lines[1] == "policy:    optimization enabled, strategy balanced, batch size in [1, 64]"
    gpu0 = lines.index(f"GPU 0  Test GPU  ({uuid_of(0)})")
    assert lines[gpu0 + 1:gpu0 + 6] == [
        "  memory         20.00 / 80.00 GiB (25.0 %)",
        "  pressure       normal",
        "  temperature    50 C",
        "  utilisation    60 %",
        "  cleanup epoch  0",
    ]
    gpu1 = lines.index(f"GPU 1  Test GPU  ({uuid_of(1)})")
    assert lines[gpu1 + 3:gpu1 + 5] == ["  temperature    51 C", "  utilisation    61 %"]
    services = lines[lines.index("services:") + 1:]
    assert len(services) == 2
    assert re.fullmatch(r"  vlm +GPU 0  batch 4  optimal 4  initial batch: .+", services[0])
    assert re.fullmatch(r"  captioner +GPU 1  batch 4  optimal \d+  .+", services[1])


async def test_status_shows_a_failed_gpu_and_paused_monitoring(svc: Service) -> None:
    svc.backend.failed.add(1)
    await svc.tick()
    svc.sampler.running = False
    svc.engine.update_settings({"enabled": False})
    r = await svc.run("status")
    assert r.code == 0
    assert "monitoring STOPPED" in r.out and "optimization DISABLED" in r.out
    assert f"GPU 1  Test GPU  ({uuid_of(1)})\n  FAILED: GPU is lost\n" in r.out


async def test_status_json_is_the_status_document(svc: Service) -> None:
    r = await svc.run("status", "--json")
    assert r.code == 0 and r.err == ""
    doc = json.loads(r.out)
    assert doc["backend"] == "scripted" and doc["monitoring"] is True and doc["samples"] == 3
    assert [g["index"] for g in doc["gpus"]] == [0, 1]
    assert doc["gpus"][0]["memory_used_bytes"] == 20 * GIB
    assert doc["gpus"][0]["memory_usage_percent"] == 25.0
    assert [s["service"] for s in doc["services"]] == ["vlm"]
    assert doc["settings"] == settings_to_dict(svc.engine.settings)


# --------------------------------------------------------------------------- monitor


class Ticking:
    """A fake ``sleep`` for monitor: records the wait, then moves GPU 0's memory up 10 GiB and ticks
    the sampler on the server's event loop, so that each poll sees a new sample."""

    def __init__(self, svc: Service, loop: asyncio.AbstractEventLoop) -> None:
        self.svc = svc
        self.loop = loop
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.svc.backend.used[0] += 10 * GIB
        asyncio.run_coroutine_threadsafe(self.svc.tick(), self.loop).result(timeout=10)


async def test_monitor_prints_a_timestamped_line_per_gpu_per_poll(svc: Service) -> None:
    sleep = Ticking(svc, asyncio.get_running_loop())
    r = await svc.run("monitor", "--duration", "15", "--interval", "5", sleep=sleep)
    assert r.code == 0 and r.err == ""
    assert len(sleep.waits) == 2  # 3 polls: at 0, 5 and 10 s
    assert all(0 < w <= 5 for w in sleep.waits)
    lines = r.out.splitlines()
    assert len(lines) == 6
    for line in lines:
        assert re.fullmatch(STAMP + r" gpu=[01] used_gib=\d+\.\d\d total_gib=80\.00 usage=\d+\.\d% pressure=\w+ "
                            r"temp=5[01]C util=6[01]% cleanup_epoch=\d+ batch=\S+", line), line
    gpu0 = [line for line in lines if " gpu=0 " in line]
    assert re.findall(r" gpu=0 used_gib=(\S+)", r.out) == ["20.00", "30.00", "40.00"]
    assert all(" batch=vlm:4/4" in line for line in gpu0[:1])
    assert all(line.endswith(" batch=-") for line in lines if " gpu=1 " in line)
    assert "\x1b[" not in r.out  # no terminal codes into a pipe


async def test_monitor_json_prints_one_object_per_poll(svc: Service) -> None:
    sleep = Ticking(svc, asyncio.get_running_loop())
    r = await svc.run("monitor", "--duration", "3", "--interval", "1", "--json", sleep=sleep)
    assert r.code == 0 and r.err == ""
    polls = [json.loads(line) for line in r.out.splitlines()]
    assert [p["poll"] for p in polls] == [1, 2, 3]
    assert all(re.fullmatch(STAMP, p["time"]) for p in polls)
    assert [p["gpus"][0]["memory_used_bytes"] for p in polls] == [20 * GIB, 30 * GIB, 40 * GIB]
    assert [p["samples"] for p in polls] == [3, 4, 5]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_monitor_on_a_terminal_redraws_the_view_and_counts_the_poll_time(svc: Service) -> None:
    now = [100.0]
    waits: list[float] = []

    def clock() -> float:  # each reading 0.25 s later: a poll takes 0.25 s, the wait after it is shorter
        now[0] += 0.25
        return now[0]

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    out = Tty()
    client = manage.AdminClient(svc.url, TOKEN)
    code = await asyncio.to_thread(manage.cmd_monitor, client, duration=15, interval=5, as_json=False, out=out,
                                   sleep=sleep, clock=clock)
    assert code == 0
    assert waits == [4.75, 4.75]
    frames = out.getvalue().split(manage.CLEAR_SCREEN)
    assert frames[0] == "" and len(frames) == 4
    for k, frame in enumerate(frames[1:], start=1):
        assert f"poll {k}/3 every 5 s" in frame.splitlines()[0]
        assert f"GPU 0  Test GPU  ({uuid_of(0)})" in frame and f"GPU 1  Test GPU  ({uuid_of(1)})" in frame
        assert re.search(r"\n  vlm +GPU 0  batch 4  optimal 4", frame)


async def test_monitor_polls_at_least_once_and_rounds_up(svc: Service) -> None:
    waits: list[float] = []
    r = await svc.run("monitor", "--duration", "2", "--interval", "5", sleep=waits.append)
    assert r.code == 0 and waits == [] and len(r.out.splitlines()) == 2
    r = await svc.run("monitor", "--duration", "11", "--interval", "5", sleep=waits.append)
    assert r.code == 0 and len(waits) == 2 and len(r.out.splitlines()) == 6


async def test_monitor_interrupted(svc: Service) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    r = await svc.run("monitor", "--duration", "10", "--interval", "5", sleep=interrupt)
    assert r.code == manage.EXIT_INTERRUPTED
    assert len(r.out.splitlines()) == 2  # the first poll was printed
    assert r.err == "vlm-gpu-optimizer: interrupted\n"


async def test_monitor_stops_at_a_failed_poll(svc: Service) -> None:
    r = await svc.run("monitor", "--duration", "10", "--interval", "5", token="wrong")
    assert "refused the token" in r.failed_with(manage.EXIT_AUTH)


# --------------------------------------------------------------------------- optimize


async def test_optimize_prints_the_changes_it_made(svc: Service) -> None:
    svc.backend.used[0] = 40 * GIB
    await svc.tick()
    assert svc.engine.decisions()[0].batch_size == 4
    r = await svc.run("optimize")
    assert r.code == 0 and r.err == ""
    assert r.out == "optimization ran: 1 batch size changed\n  vlm on GPU 0: 4 -> 23\n"
    assert svc.engine.decisions()[0].batch_size == 23
    assert svc.audits() == ["optimize"]


async def test_optimize_with_nothing_to_change(svc: Service) -> None:
    assert (await svc.run("optimize")).code == 0
    batch = svc.engine.decisions()[0].batch_size
    assert batch > 4
    svc.backend.used[0] += (batch - 4) * GIB  # the service adopts the new batch, 1 GiB per item
    for _ in range(3):
        await svc.tick()
    r = await svc.run("optimize")
    assert r.code == 0 and r.out == "optimization ran: no batch size changed\n"
    assert svc.engine.decisions()[0].batch_size == batch


async def test_optimize_twice_before_a_new_sample_does_not_grow_the_batch_again(svc: Service) -> None:
    svc.backend.used[0] = 40 * GIB  # at batch 4, 1 GiB per item
    await svc.tick()
    assert (await svc.run("optimize")).code == 0
    assert svc.engine.decisions()[0].batch_size == 23  # 40 + 19 GiB: 74 % of 80 GiB, the 75 % target
    again = await svc.run("optimize")  # no new sample: nothing new is known, and the reply says when it runs
    assert again.out == (
        "optimization ran: no batch size changed\n"
        "optimization deferred for 1 service:\n"
        f"  GPU 0 (vlm): deferred to the first sample from {clock_text(svc.clock() + 7.5)} on, when the samples "
        "show the last batch change (earlier ones would count its headroom twice); batch kept until then\n")
    batch = svc.engine.decisions()[0].batch_size
    safety_gib = 0.95 * 80 - 1  # memory_threshold_oom of total, less memory_reserve_mb
    assert 40 - 4 + batch <= safety_gib


async def test_optimize_json(svc: Service) -> None:
    r = await svc.run("optimize", "--json")
    assert r.code == 0
    doc = json.loads(r.out)
    assert [e["kind"] for e in doc["events"] if e["kind"] == "batch_changed"] == ["batch_changed"]
    assert doc["services"][0]["batch_size"] == svc.engine.decisions()[0].batch_size


# --------------------------------------------------------------------------- set-batch-size


async def test_set_batch_size_defaults_to_service_vlm_and_takes_a_ttl(svc: Service) -> None:
    r = await svc.run("set-batch-size", "8", "--ttl", "60")
    assert r.code == 0 and r.err == ""
    assert r.out.startswith("vlm on GPU 0: batch size set to 8 for 60 s; publishing 8 (")
    svc_state = svc.engine.state.services[(0, "vlm")]
    assert svc_state.override == 8 and svc_state.override_until == svc.clock() + 60
    assert svc.engine.decisions()[0].batch_size == 8


async def test_set_batch_size_on_a_gpu_by_uuid_until_cleared(svc: Service) -> None:
    r = await svc.run("set-batch-size", "3", "--service", "captioner", "--gpu", uuid_of(1))
    assert r.code == 0
    assert "captioner on GPU 1: batch size set to 3 until cleared" in r.out
    assert svc.override("captioner", 1) == 3
    assert svc.engine.state.services[(1, "captioner")].override_until is None

    r = await svc.run("set-batch-size", "--clear", "--service", "captioner", "--gpu", "1")
    assert r.code == 0 and r.err == ""
    assert r.out.startswith("captioner on GPU 1: manual batch size cleared; publishing ")
    assert svc.override("captioner", 1) is None
    assert svc.audits() == ["set_batch_size", "clear_batch_size"]


async def test_set_batch_size_errors_name_the_field_and_change_nothing(svc: Service) -> None:
    err = (await svc.run("set-batch-size", "0")).failed_with(manage.EXIT_SERVICE)
    assert "HTTP 400" in err and "batch_size: must be an integer in [1, 4096], got 0" in err
    err = (await svc.run("set-batch-size", "8", "--gpu", "7")).failed_with(manage.EXIT_SERVICE)
    assert "gpu: no GPU 7; available GPU indexes: [0, 1]" in err
    err = (await svc.run("set-batch-size", "8", "--service", "bad name!")).failed_with(manage.EXIT_SERVICE)
    assert "service: must be" in err
    err = (await svc.run("set-batch-size", "--clear", "--service", "ghost")).failed_with(manage.EXIT_SERVICE)
    assert "HTTP 404" in err and "'ghost' is not known" in err and "admin API (default port" not in err
    assert svc.override() is None and svc.audits() == []


@pytest.mark.parametrize("argv", [["set-batch-size"], ["set-batch-size", "--clear", "5"],
                                  ["set-batch-size", "--clear", "--ttl", "5"]])
async def test_set_batch_size_usage_errors_send_nothing(svc: Service, argv: list[str]) -> None:
    err = (await svc.run(*argv)).failed_with(manage.EXIT_USAGE)
    assert "set-batch-size" in err
    assert svc.audits() == []


# --------------------------------------------------------------------------- enable, disable, monitoring


async def test_disable_and_enable(svc: Service) -> None:
    r = await svc.run("disable")
    assert (r.code, r.out, r.err) == (0, "optimization disabled\n", "")
    assert svc.engine.settings.enabled is False
    r = await svc.run("disable")
    assert (r.code, r.out) == (0, "optimization was already disabled\n")
    r = await svc.run("enable")  # optimizes at once: the batch grows into the headroom
    assert (r.code, r.out) == (0, "optimization enabled: 1 batch size changed\n  vlm on GPU 0: 4 -> 43\n")
    assert svc.engine.settings.enabled is True
    r = await svc.run("enable")
    assert (r.code, r.out) == (0, "optimization was already enabled: no batch size changed\n")
    r = await svc.run("disable")
    assert (r.code, r.out) == (0, "optimization disabled: 1 batch size back to the default\n  vlm on GPU 0: 43 -> 4\n")


async def test_enable_right_after_a_batch_change_says_what_it_deferred_and_until_when(svc: Service) -> None:
    assert (await svc.run("optimize")).code == 0  # a batch change: the samples do not show it yet
    assert (await svc.run("disable")).code == 0
    r = await svc.run("enable")
    adopted = svc.engine.state.gpus[0].adopt_after
    assert adopted > svc.clock()
    assert r.out == (
        "optimization enabled: no batch size changed\n"
        "optimization deferred for 1 service:\n"
        f"  GPU 0 (vlm): deferred to the first sample from {clock_text(adopted)} on, when the samples show the "
        "last batch change (earlier ones would count its headroom twice); batch kept until then\n")
    assert "optimization disabled" not in svc.engine.decisions()[0].reason
    svc.clock.advance(adopted - svc.clock())
    await svc.tick(advance=0)  # the first settled sample: the deferred optimization runs
    assert svc.engine.decisions()[0].batch_size == 43
    assert svc.engine.state.gpus[0].requested_at is None and svc.engine.deferred_optimizations() == ()


async def test_a_change_that_could_not_be_saved_fails_with_one_line_naming_the_file(
        aiohttp_server: AiohttpServer, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        logs: list[EventDict]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    engine = Engine(SETTINGS)
    sampler = Sampler(ScriptedBackend(1), engine, clock=FakeClock(), sleep=no_sleep)
    persister = Persister(engine, StateFile(blocker / "state.json"))
    admin = build_admin_app(build_app(engine, sampler, run_sampler=False, persister=persister), TOKEN.encode())
    server = await aiohttp_server(admin)
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["disable", "--url", f"http://{server.host}:{server.port}", "--token", TOKEN])
    r = Result(code, *capsys.readouterr())
    err = r.failed_with(manage.EXIT_SERVICE)
    assert "HTTP 503" in err and "applied in memory but not saved" in err and str(blocker / "state.json") in err
    assert engine.settings.enabled is False  # applied, as the message says


async def test_stop_and_start_monitoring(svc: Service) -> None:
    r = await svc.run("stop-monitoring")
    assert (r.code, r.out, r.err) == (0, "monitoring stopped\n", "")
    assert svc.sampler.running is False
    r = await svc.run("stop-monitoring")
    assert (r.code, r.out) == (0, "monitoring was already stopped\n")
    r = await svc.run("start-monitoring")
    assert (r.code, r.out) == (0, "monitoring started\n")
    assert svc.sampler.running is True
    r = await svc.run("start-monitoring")
    assert (r.code, r.out) == (0, "monitoring was already running\n")
    assert svc.audits() == ["stop_monitoring"] * 2 + ["start_monitoring"] * 2


# --------------------------------------------------------------------------- configure


async def test_configure_sends_only_the_given_settings(svc: Service) -> None:
    before = svc.engine.settings
    r = await svc.run("configure", "--strategy", "aggressive", "--warning-threshold", "0.7",
                      "--max-batch-size", "32", "--min-batch-size", "1", "--memory-reserve-mb", "2048")
    assert r.code == 0 and r.err == ""
    s = svc.engine.settings
    assert (s.strategy, s.memory_threshold_warning, s.max_batch_size, s.memory_reserve_mb) == (
        Strategy.AGGRESSIVE, 0.7, 32, 2048)
    assert dataclasses.replace(s, strategy=before.strategy, memory_threshold_warning=0.8, max_batch_size=64,
                               memory_reserve_mb=1024) == before
    assert r.out.splitlines() == ["changed (pinned at runtime; configure --reset KEY unpins):",
                                  "  max_batch_size = 32", "  memory_reserve_mb = 2048",
                                  "  memory_threshold_warning = 0.7", '  strategy = "aggressive"',
                                  "unchanged (already so, not pinned): min_batch_size"]
    # min_batch_size was 1 already: not pinned
    assert set(svc.engine.runtime) == {"strategy", "memory_threshold_warning", "max_batch_size", "memory_reserve_mb"}

    again = await svc.run("configure", "--strategy", "aggressive")
    assert again.code == 0
    assert again.out == "nothing changed: the settings already had these values (nothing pinned)\n"


async def test_configure_every_flag(svc: Service) -> None:
    values = {"--strategy": "conservative", "--warning-threshold": "0.6", "--critical-threshold": "0.85",
              "--oom-threshold": "0.9", "--max-batch-size": "48", "--min-batch-size": "2",
              "--monitoring-interval": "2", "--optimization-interval": "30", "--cleanup-interval": "120",
              "--temperature-threshold": "85", "--gc-threshold": "0.8", "--fragmentation-threshold": "0.4",
              "--memory-reserve-mb": "512", "--target-memory-utilization": "0.7",
              "--oom-cost-s": "240"}
    assert {f"--{dest.replace('_', '-')}" for dest in manage.CONFIGURE_FLAGS} == set(values)
    assert set(manage.CONFIGURE_FLAGS.values()) <= set(SETTING_KEYS)
    r = await svc.run("configure", *[x for kv in values.items() for x in kv])
    assert r.code == 0, r.err
    got = settings_to_dict(svc.engine.settings)
    for dest, key in manage.CONFIGURE_FLAGS.items():
        raw = values[f"--{dest.replace('_', '-')}"]
        assert str(got[key]) == raw or got[key] == float(raw), key


@pytest.mark.parametrize(("argv", "field", "flag"), [
    (["--warning-threshold", "1.5"], "memory_threshold_warning", "--warning-threshold"),
    # a relation between settings: all-or-nothing, the valid strategy is not applied either
    (["--strategy", "aggressive", "--critical-threshold", "0.5"], "memory_threshold_critical",
     "--critical-threshold"),
    (["--max-batch-size", "0"], "max_batch_size", "--max-batch-size"),
    (["--min-batch-size", "65"], "min_batch_size", "--min-batch-size"),
])
async def test_configure_invalid_value_names_the_field_and_changes_nothing(svc: Service, argv: list[str],
                                                                           field: str, flag: str) -> None:
    before = svc.engine.settings
    err = (await svc.run("configure", *argv)).failed_with(manage.EXIT_SERVICE)
    assert f"HTTP 400): {field}: " in err
    assert f"({flag}); nothing was changed" in err
    assert svc.engine.settings == before and svc.engine.runtime == {} and svc.audits() == []


async def test_configure_relation_error_names_the_setting_the_service_named(svc: Service) -> None:
    err = (await svc.run("configure", "--warning-threshold", "0.95")).failed_with(manage.EXIT_SERVICE)
    assert "memory_threshold_critical: thresholds must satisfy" in err
    assert err.endswith("(got 0.95 < 0.9 < 0.95); nothing was changed\n")  # no flag that was not given
    assert svc.engine.settings == SETTINGS


async def test_configure_without_a_setting_is_a_usage_error(svc: Service) -> None:
    err = (await svc.run("configure")).failed_with(manage.EXIT_USAGE)
    assert "at least one setting" in err
    assert svc.engine.settings == SETTINGS and svc.audits() == []


def test_configure_bad_flag_values_are_argparse_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--max-batch-size", "many"], ["--strategy", "turbo"], ["--gc-threshold", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(["configure", *argv])
        assert exc.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


async def test_configure_reset_unpins_one_setting_then_all(svc: Service) -> None:
    await svc.run("configure", "--strategy", "aggressive", "--max-batch-size", "8", "--gc-threshold", "0.7")
    assert set(svc.engine.runtime) == {"strategy", "max_batch_size", "gc_threshold"}

    r = await svc.run("configure", "--reset", "max_batch_size", "--reset", "cleanup_interval")
    assert r.code == 0 and r.err == ""
    assert r.out.splitlines() == ["unpinned; now from the config file, environment or flags:",
                                  "  max_batch_size = 64", "not pinned, left as they were: cleanup_interval"]
    assert svc.engine.settings.max_batch_size == SETTINGS.max_batch_size  # the service's configuration, at once
    assert svc.engine.runtime == {"strategy": "aggressive", "gc_threshold": 0.7}

    r = await svc.run("configure", "--reset-all")
    assert r.code == 0
    assert r.out.splitlines() == ["unpinned; now from the config file, environment or flags:",
                                  "  gc_threshold = 0.85", '  strategy = "balanced"']
    assert svc.engine.settings == SETTINGS and svc.engine.runtime == {}
    r = await svc.run("configure", "--reset-all")
    assert r.out == "nothing to unpin: no setting was pinned at runtime\n"
    r = await svc.run("configure", "--reset", "strategy")
    assert r.out == "nothing to unpin: strategy was not pinned\n"
    assert svc.audits() == ["configure", "reset_config", "reset_config", "reset_config", "reset_config"]


@pytest.mark.parametrize(("argv", "says"), [
    (["--reset", "strategy", "--reset-all"], "not both"),
    (["--reset", "strategy", "--max-batch-size", "8"], "not both at once"),
    (["--reset-all", "--strategy", "adaptive"], "not both at once"),
])
async def test_configure_reset_usage_errors(svc: Service, argv: list[str], says: str) -> None:
    svc.engine.update_settings({"strategy": "aggressive"})
    err = (await svc.run("configure", *argv)).failed_with(manage.EXIT_USAGE)
    assert says in err
    assert svc.engine.runtime == {"strategy": "aggressive"} and svc.audits() == []


def test_configure_reset_of_an_unknown_setting_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("turbo", "profiles", "warning-threshold"):
        with pytest.raises(SystemExit) as exc:
            main(["configure", "--reset", key])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--reset" in err and "invalid choice" in err and "memory_threshold_warning" in err


async def test_configure_reset_that_the_service_refuses_changes_nothing(svc: Service) -> None:
    svc.engine.update_settings({"max_batch_size": 128, "min_batch_size": 100})
    err = (await svc.run("configure", "--reset", "max_batch_size")).failed_with(manage.EXIT_SERVICE)
    assert "HTTP 400): min_batch_size: must be <= max_batch_size (64)" in err and "nothing was changed" in err
    assert svc.engine.runtime == {"max_batch_size": 128, "min_batch_size": 100}


async def test_status_shows_what_is_pinned(svc: Service) -> None:
    r = await svc.run("status")
    assert r.out.splitlines()[2] == (
        "pinned:    nothing (every setting follows the config file, environment and flags)")
    await svc.run("configure", "--strategy", "adaptive", "--max-batch-size", "32")
    r = await svc.run("status")
    assert r.out.splitlines()[2] == (
        'pinned:    max_batch_size=32, strategy="adaptive" (configure --reset KEY or --reset-all unpins)')
    doc = json.loads((await svc.run("status", "--json")).out)
    assert doc["runtime_settings"] == {"strategy": "adaptive", "max_batch_size": 32}


# --------------------------------------------------------------------------- export, import


def exported(svc: Service) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "version": 1, "settings": settings_to_dict(svc.engine.settings),
            "pinned": sorted(svc.engine.runtime)}


async def test_export_config_to_json_yaml_and_stdout(svc: Service, tmp_path: Path) -> None:
    svc.engine.update_settings({"strategy": "adaptive"})
    js, ym, yml = tmp_path / "c.json", tmp_path / "c.yaml", tmp_path / "c.YML"
    r = await svc.run("export-config", "--output", str(js))
    assert r.code == 0 and r.out == f"exported {len(SETTING_KEYS)} settings to {js} (JSON)\n"
    assert json.loads(js.read_text()) == exported(svc)
    r = await svc.run("export-config", "-o", str(ym))
    assert r.code == 0 and "(YAML)" in r.out
    assert yaml.safe_load(ym.read_text()) == exported(svc)
    assert not ym.read_text().lstrip().startswith("{")  # block YAML, not JSON
    assert (await svc.run("export-config", "-o", str(yml))).code == 0
    assert yaml.safe_load(yml.read_text()) == exported(svc)
    for argv in (["export-config"], ["export-config", "--output", "-"]):
        r = await svc.run(*argv)
        assert r.code == 0 and r.err == ""
        assert json.loads(r.out) == exported(svc)


async def test_export_config_to_an_unwritable_place(svc: Service, tmp_path: Path) -> None:
    err = (await svc.run("export-config", "-o", str(tmp_path / "no" / "such" / "c.json"))).failed_with(
        manage.EXIT_USAGE)
    assert "cannot write" in err


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
async def test_import_config_round_trips_an_export(svc: Service, tmp_path: Path, suffix: str) -> None:
    svc.engine.update_settings({"strategy": "conservative", "max_batch_size": 40, "gc_threshold": 0.8})
    saved = svc.engine.settings
    path = tmp_path / f"saved{suffix}"
    assert (await svc.run("export-config", "--output", str(path))).code == 0
    svc.engine.update_settings({"strategy": "aggressive", "max_batch_size": 20, "monitoring_interval": 2.0})
    r = await svc.run("import-config", str(path))
    assert r.code == 0 and r.err == ""
    assert r.out == (f"imported {path}; changed: max_batch_size, monitoring_interval, strategy\n"
                     "pinned at runtime: gc_threshold, max_batch_size, strategy\n")
    assert svc.engine.settings == saved
    assert set(svc.engine.runtime) == {"strategy", "max_batch_size", "gc_threshold"}  # monitoring_interval: unpinned
    again = await svc.run("import-config", str(path))
    assert again.out == f"imported {path}; nothing changed\npinned at runtime: gc_threshold, max_batch_size, strategy\n"


async def test_import_config_takes_a_plain_mapping_of_settings(svc: Service, tmp_path: Path) -> None:
    path = tmp_path / "plain.yml"
    path.write_text("strategy: conservative\nmax_batch_size: 12\ncleanup_interval: 120\n")
    svc.engine.update_settings({"gc_threshold": 0.7})
    r = await svc.run("import-config", str(path))
    assert r.code == 0
    assert r.out.splitlines()[1] == "pinned at runtime: cleanup_interval, max_batch_size, strategy"
    # the runtime layer is replaced: keys left out follow the service's configuration, not the defaults
    assert svc.engine.settings == dataclasses.replace(SETTINGS, strategy=Strategy.CONSERVATIVE, max_batch_size=12,
                                                      cleanup_interval=120.0)
    assert svc.engine.runtime == {"strategy": "conservative", "max_batch_size": 12, "cleanup_interval": 120.0}


@pytest.mark.parametrize(("name", "text", "code", "says"), [
    ("bad.json", json.dumps({"format": EXPORT_FORMAT, "version": 1,
                             "settings": {"memory_threshold_warning": 2}}),
     manage.EXIT_SERVICE, "memory_threshold_warning: must be in (0, 1], got 2; nothing was changed"),
    ("bad.yaml", "max_batch_size: 8\nmin_batch_size: 9\n", manage.EXIT_SERVICE, "min_batch_size: must be <="),
    ("unknown.json", '{"turbo": true}', manage.EXIT_SERVICE, "turbo: unknown key"),
    ("other.json", json.dumps({"format": "something-else", "settings": {}}), manage.EXIT_SERVICE, "format:"),
    ("broken.json", '{"strategy": ', manage.EXIT_USAGE, "is not valid JSON"),
    ("broken.yaml", "strategy: [\n", manage.EXIT_USAGE, "is not valid YAML"),
    ("list.yaml", "- strategy\n", manage.EXIT_USAGE, "must hold a mapping"),
    ("empty.yaml", "", manage.EXIT_USAGE, "must hold a mapping"),
])
async def test_import_of_an_invalid_file_changes_nothing(svc: Service, tmp_path: Path, name: str, text: str,
                                                         code: int, says: str) -> None:
    svc.engine.update_settings({"strategy": "adaptive"})
    before = svc.engine.settings
    path = tmp_path / name
    path.write_text(text)
    err = (await svc.run("import-config", str(path))).failed_with(code)
    assert says in err
    assert svc.engine.settings == before and svc.audits() == []


async def test_import_of_a_missing_file(svc: Service, tmp_path: Path) -> None:
    err = (await svc.run("import-config", str(tmp_path / "nope.json"))).failed_with(manage.EXIT_USAGE)
    assert "cannot read" in err and "nope.json" in err


# --------------------------------------------------------------------------- tokens and URLs


async def test_wrong_token_is_refused_and_changes_nothing(svc: Service) -> None:
    err = (await svc.run("disable", token="not-it")).failed_with(manage.EXIT_AUTH)
    assert "refused the token (HTTP 401)" in err and "wrong" in err
    assert svc.engine.settings.enabled is True


async def test_missing_token_says_so(svc: Service) -> None:
    err = (await svc.run("stop-monitoring", token=None)).failed_with(manage.EXIT_AUTH)
    assert "HTTP 401" in err and "no token given" in err and manage.TOKEN_ENV in err
    assert svc.sampler.running is True


async def test_token_from_a_file_or_the_environment_and_url_from_the_environment(
        svc: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    r = await svc.run("status", "--json", "--token-file", str(token_file), token=None)
    assert r.code == 0 and json.loads(r.out)["samples"] == 3

    monkeypatch.setenv(manage.TOKEN_ENV, TOKEN)
    monkeypatch.setenv(manage.URL_ENV, svc.url + "/")
    svc.capsys.readouterr()
    code = await asyncio.to_thread(main, ["disable"])
    assert code == 0 and svc.capsys.readouterr().out.startswith("optimization disabled")
    assert svc.engine.settings.enabled is False


async def test_token_usage_errors(svc: Service, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    err = (await svc.run("status", "--token-file", str(empty), token=None)).failed_with(manage.EXIT_USAGE)
    assert "is empty" in err
    err = (await svc.run("status", "--token-file", str(tmp_path / "none"), token=None)).failed_with(
        manage.EXIT_USAGE)
    assert "cannot read --token-file" in err
    err = (await svc.run("status", "--token-file", str(empty))).failed_with(manage.EXIT_USAGE)
    assert "not both" in err


async def test_bad_url_is_a_usage_error(svc: Service) -> None:
    for url in ("ftp://127.0.0.1:8081", "127.0.0.1:8081", "http://127.0.0.1:8081/?x=1"):
        err = (await svc.run("status", url=url)).failed_with(manage.EXIT_USAGE)
        assert "--url" in err


def all_commands(tmp: Path) -> list[list[str]]:
    doc = tmp / "c.json"
    doc.write_text('{"strategy": "balanced"}')
    return [["status"], ["status", "--json"], ["monitor", "--duration", "10", "--interval", "5"],
            ["monitor", "--json"], ["optimize"], ["set-batch-size", "8"], ["set-batch-size", "--clear"],
            ["enable"], ["disable"], ["start-monitoring"], ["stop-monitoring"], ["configure", "--strategy", "balanced"],
            ["export-config", "-o", str(tmp / "out.json")], ["import-config", str(doc)]]


async def test_every_command_against_a_dead_port_is_one_clear_line(svc: Service, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for argv in all_commands(tmp_path):
        err = (await svc.run(*argv, url=dead)).failed_with(manage.EXIT_UNREACHABLE)
        assert err == (f"vlm-gpu-optimizer: cannot reach the admin API at {dead}: connection refused "
                       f"(is the service running? check --url or {manage.URL_ENV})\n"), argv
    assert not (tmp_path / "out.json").exists()


async def test_every_command_against_the_live_service_succeeds(svc: Service, tmp_path: Path) -> None:
    for argv in all_commands(tmp_path):
        r = await svc.run(*argv, sleep=lambda s: None)
        assert r.code == 0 and r.err == "" and r.out, argv


async def test_a_service_that_does_not_answer_times_out(svc: Service) -> None:
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        err = (await svc.run("status", "--timeout", "0.2", url=url)).failed_with(manage.EXIT_UNREACHABLE)
    assert err == (f"vlm-gpu-optimizer: the admin API at {url} did not answer within 0.2 s "
                   "(raise --timeout, or check that the service is not stuck)\n")


async def test_a_server_error_is_one_line(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> tuple[()]:
        raise RuntimeError("policy bug")

    monkeypatch.setattr(svc.engine, "optimize_now", broken)
    err = (await svc.run("optimize")).failed_with(manage.EXIT_SERVICE)
    assert err == "vlm-gpu-optimizer: the service failed on POST /admin/optimize (HTTP 500): internal error\n"


async def test_the_read_api_port_is_not_the_admin_api(svc: Service, aiohttp_server: AiohttpServer) -> None:
    read_api: TestServer = await aiohttp_server(build_app(svc.engine, svc.sampler, run_sampler=False))
    url = f"http://{read_api.host}:{read_api.port}"
    err = (await svc.run("status", url=url)).failed_with(manage.EXIT_SERVICE)
    assert "HTTP 404" in err and f"is {url} the admin API (default port 8081)?" in err


async def test_an_answer_that_is_not_json(svc: Service, aiohttp_server: AiohttpServer) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/admin/status", page)
    other = await aiohttp_server(app)
    url = f"http://{other.host}:{other.port}"
    err = (await svc.run("status", url=url)).failed_with(manage.EXIT_SERVICE)
    assert "answered HTTP 200 but not JSON" in err


async def test_token_that_no_header_can_carry_is_a_usage_error(svc: Service, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("two words", "t\u00f6ken", "tab\there"):
        err = (await svc.run("disable", token=bad)).failed_with(manage.EXIT_USAGE)
        assert "--token must be" in err and "printable ASCII" in err
    token_file = tmp_path / "token"
    token_file.write_text("t\u00f6ken\n", encoding="utf-8")
    err = (await svc.run("disable", "--token-file", str(token_file), token=None)).failed_with(manage.EXIT_USAGE)
    assert str(token_file) in err and "printable ASCII" in err
    monkeypatch.setenv(manage.TOKEN_ENV, "two words")
    err = (await svc.run("disable", token=None)).failed_with(manage.EXIT_USAGE)
    assert f"${manage.TOKEN_ENV} must be" in err
    assert svc.engine.settings.enabled is True


# --------------------------------------------------------------------------- the token a local serve generated


def write_generated(directory: Path, port: int, token: str = TOKEN) -> Path:
    """What ``serve`` leaves for the CLI: ``admin-token-PORT`` (0600) in a private directory (0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"admin-token-{port}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_without_a_token_the_cli_reads_the_one_a_local_serve_generated(svc: Service, clean_env: Path) -> None:
    write_generated(clean_env / "vlm-gpu-optimizer", port_of(svc.url))
    r = await svc.run("disable", token=None)
    assert (r.code, r.out, r.err) == (0, "optimization disabled\n", "")
    assert svc.engine.settings.enabled is False
    # localhost and 127.0.0.1 are the same machine, and so the same file
    r = await svc.run("enable", url=svc.url.replace("127.0.0.1", "localhost"), token=None)
    assert r.code == 0, r.err
    # a token given explicitly is used as given, never replaced by the file's
    err = (await svc.run("disable", token="not-it")).failed_with(manage.EXIT_AUTH)
    assert "refused the token" in err
    assert svc.engine.settings.enabled is True


async def test_the_generated_token_is_looked_for_next_to_the_state_path_first(
        svc: Service, clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_generated(clean_env / "vlm-gpu-optimizer", port_of(svc.url), "stale-token")
    state = tmp_path / "state" / "state.json"
    write_generated(state.parent, port_of(svc.url))
    monkeypatch.setenv(manage.STATE_PATH_ENV, str(state))
    assert (await svc.run("stop-monitoring", token=None)).code == 0
    assert svc.sampler.running is False


async def test_a_generated_token_that_is_refused_says_where_it_came_from(svc: Service, clean_env: Path) -> None:
    path = write_generated(clean_env / "vlm-gpu-optimizer", port_of(svc.url), "from-an-earlier-serve")
    err = (await svc.run("disable", token=None)).failed_with(manage.EXIT_AUTH)
    assert "refused the token (HTTP 401)" in err and str(path) in err
    assert svc.engine.settings.enabled is True


async def test_no_generated_token_says_where_it_was_looked_for(svc: Service, clean_env: Path) -> None:
    err = (await svc.run("status", token=None)).failed_with(manage.EXIT_AUTH)
    assert "no token given" in err
    assert f"no generated token at {clean_env / 'vlm-gpu-optimizer' / f'admin-token-{port_of(svc.url)}'}" in err


async def test_a_generated_token_where_others_can_write_is_not_used(svc: Service, clean_env: Path) -> None:
    directory = clean_env / "vlm-gpu-optimizer"
    write_generated(directory, port_of(svc.url))
    directory.chmod(0o777)
    err = (await svc.run("disable", token=None)).failed_with(manage.EXIT_AUTH)
    assert "no token given" in err and "writable by other users" in err
    assert svc.engine.settings.enabled is True


def test_a_generated_token_is_only_ever_sent_to_a_loopback_address(clean_env: Path) -> None:
    write_generated(clean_env / "vlm-gpu-optimizer", 8081)
    env = {"XDG_RUNTIME_DIR": str(clean_env)}
    for url in ("http://127.0.0.1:8081", "http://localhost:8081", "http://[::1]:8081", "http://127.0.0.2:8081/"):
        assert manage.generated_token(url, env)[0] == TOKEN, url
    for url in ("http://10.0.0.1:8081", "http://optimizer.example:8081", "http://localhost.evil.example:8081",
                "http://127.0.0.1.nip.io:8081", "http://[::ffff:a00:1]:8081", "http://127.0.0.1:bad"):
        assert manage.generated_token(url, env) == (None, None), url
    assert manage.generated_token("http://127.0.0.1:8082", env)[0] is None  # another port, another serve


# --------------------------------------------------------------------------- no redirects, no proxies


@dataclass
class Recorder:
    """A TCP server that records every request it receives and answers 200 ``{}``: where the token must
    never go (a redirect's target, a proxy)."""

    url: str
    received: list[bytes]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.append(await reader.readuntil(b"\r\n\r\n"))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            received.append(bytes(getattr(exc, "partial", b"")))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield Recorder(f"http://localhost:{port}", received)  # another host name and port than the admin API's
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_is_an_error_and_the_token_never_follows_it(
        svc: Service, aiohttp_server: AiohttpServer, recorder: Recorder, code: int) -> None:
    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=code, headers={"Location": recorder.url + request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    redirector = await aiohttp_server(app)
    url = f"http://{redirector.host}:{redirector.port}"
    for argv in (["status"], ["stop-monitoring"], ["configure", "--max-batch-size", "8"],
                 ["set-batch-size", "--clear"]):
        err = (await svc.run(*argv, url=url)).failed_with(manage.EXIT_SERVICE)
        assert f"redirect (HTTP {code}) to {recorder.url}/admin/" in err and "not followed" in err, argv
    assert recorder.received == []
    assert svc.sampler.running is True


async def test_a_redirect_location_cannot_write_to_the_terminal(svc: Service) -> None:
    async def moved(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://x/\x1b[2J\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")  # aiohttp would refuse to send it
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(moved, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        err = (await svc.run("status", url=url)).failed_with(manage.EXIT_SERVICE)
    finally:
        server.close()
        await server.wait_closed()
    assert "\x1b" not in err and "to http://x/\\x1b[2J" in err


async def test_no_proxy_from_the_environment_is_used(svc: Service, recorder: Recorder) -> None:
    """In a process of its own, as an operator runs it: urllib reads the proxy variables when it builds its
    first opener, so an in-process run could miss them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    env.update({name: recorder.url for name in PROXY_ENV})

    def cli(*argv: str, url: str = svc.url) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "optimizer", *argv, "--url", url, "--token", TOKEN],
                              capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)

    for argv in (["status"], ["stop-monitoring"], ["configure", "--max-batch-size", "8"]):
        done = await asyncio.to_thread(cli, *argv)
        assert done.returncode == 0 and done.stderr == "", (argv, done.stderr)
    https = await asyncio.to_thread(cli, "status", url=svc.url.replace("http://", "https://"))  # no TLS there
    assert https.returncode == manage.EXIT_UNREACHABLE, https.stderr
    assert recorder.received == []
    assert svc.sampler.running is False and svc.engine.settings.max_batch_size == 8


async def test_a_403_shows_what_the_service_said(svc: Service, aiohttp_server: AiohttpServer) -> None:
    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"error": "requests from web pages are refused", "header": "Origin"}, status=403)

    app = web.Application()
    app.router.add_get("/admin/status", forbidden)
    other = await aiohttp_server(app)
    err = (await svc.run("status", url=f"http://{other.host}:{other.port}")).failed_with(manage.EXIT_AUTH)
    assert "HTTP 403" in err and "requests from web pages are refused" in err


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", manage.COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vlm-gpu-optimizer {command} ")
    for needle in ("--url", "--token", "--token-file", "--timeout", "exit codes:", "/admin/"):
        assert needle in out, needle
    top = build_parser().format_help()
    assert command in top


def test_set_batch_size_help_documents_the_default_service(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["set-batch-size", "--help"])
    assert "(default: vlm)" in capsys.readouterr().out
