"""The ``vlm-gpu-optimizer`` command: ``serve``, ``simulate``, ``benchmark``, and the management commands
(``status``, ``monitor``, ``optimize``, ``set-batch-size``, ... in :mod:`optimizer.manage`), which
steer a running service through its admin API. The parser and its help texts are in :mod:`optimizer.cli_parser`
(``build_parser`` is importable from here)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from optimizer import manage
from optimizer.admin_access import (
    TOKEN_RE,
    TOKEN_RULE,
    AccessError,
    GeneratedToken,
    generated_token_path,
    read_token_file,
    token_name,
)
from optimizer.cli_parser import build_parser
from optimizer.config import BackendName, Config, ConfigError, ServerSettings, load_config
from optimizer.logs import configure_logging
from optimizer.simulation.run import MEASURES, SimulationResult, simulate, with_scenario_profiles
from optimizer.simulation.scenario import DEFAULT_SCENARIO, ScenarioError, load_scenario

__all__ = ["EXIT_CONFIG", "build_parser", "cmd_benchmark", "cmd_serve", "cmd_simulate", "main"]

log = structlog.get_logger("optimizer")

EXIT_CONFIG = 2  # every start-up error of serve (configuration, GPU backend, listeners): one line on stderr


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("strategy", "monitoring_interval", "optimization_interval", "max_batch_size", "min_batch_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _load(args: argparse.Namespace, server: dict[str, Any] | None = None) -> Config:
    kube = {k[len("kube_"):]: v for k, v in vars(args).items() if k.startswith("kube_") and v is not None}
    return load_config(args.config, cli_settings=_cli_settings(args), cli_server=server or {}, cli_kube=kube)


def cmd_serve(args: argparse.Namespace) -> int:
    server_flags = {k: getattr(args, k) for k in ("backend", "scenario", "host", "port", "log_format", "log_level",
                                                  "admin_host", "admin_port", "admin_token_file",
                                                  "admin_allowed_hosts", "state_path")
                    if getattr(args, k) is not None}
    try:
        cfg = _load(args, server_flags)
    except ConfigError as exc:
        print(f"vlm-gpu-optimizer: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.server.log_format, cfg.server.log_level)
    try:
        token, generated = _admin_token(cfg.server)
    except ConfigError as exc:
        print(f"vlm-gpu-optimizer: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from optimizer.api import build_app
    from optimizer.api.admin import build_admin_app
    from optimizer.api.timeouts import ReadTimeouts
    from optimizer.engine import Engine
    from optimizer.gpu.factory import make_hardware_backend
    from optimizer.simulation.backend import SimulatedBackend
    from optimizer.gpu.types import BackendError, GpuBackend
    from optimizer.persistence import Persister, StateFile
    from optimizer.sampler import Sampler
    from optimizer.server import StartupError, serve_until_signalled
    from optimizer.simulation.link import EngineLink

    settings = cfg.settings
    backend: GpuBackend
    if cfg.server.backend is BackendName.SIMULATED:
        try:
            scenario = load_scenario(cfg.server.scenario or DEFAULT_SCENARIO)
        except ScenarioError as exc:
            print(f"vlm-gpu-optimizer: invalid scenario: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        settings = with_scenario_profiles(settings, scenario)
        engine = Engine(settings)
        sim = SimulatedBackend(scenario, settings, origin=time.time())
        sim.attach(EngineLink(engine, origin=sim.origin))
        backend = sim
        log.info("simulated_backend", scenario=scenario.name, gpus=len(scenario.gpus),
                 services=[s.name for s in scenario.services])
    else:
        if cfg.server.scenario is not None:
            print("vlm-gpu-optimizer: --scenario needs --backend simulated", file=sys.stderr)
            return EXIT_CONFIG
        try:
            backend = make_hardware_backend(cfg.server.backend)
        except BackendError as exc:
            print(f"vlm-gpu-optimizer: GPU backend {cfg.server.backend.value} failed: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        engine = Engine(settings, has_gpus=backend.name != "none")
    persister = None
    if cfg.server.state_path is not None:
        persister = Persister(engine, StateFile(cfg.server.state_path))
        persister.load(time.time())
    sampler = Sampler(backend, engine)
    discovery = None
    if cfg.kube.discovery:
        from optimizer.kube.discovery import Discovery

        discovery = Discovery(engine, cfg.kube, clock=sampler.clock)
    app = build_app(engine, sampler, persister=persister, discovery=discovery)
    admin = build_admin_app(app, token, allowed_hosts=(*cfg.server.admin_allowed_hosts, cfg.server.admin_host))
    admin_host = cfg.server.admin_host
    on_listening = None
    if generated is not None:
        try:
            generated.prepare()
        except AccessError as exc:
            print(f"vlm-gpu-optimizer: invalid configuration: server.admin_token_file: no token configured, and "
                  f"the generated one cannot be kept: {exc} (give --admin-token-file, or a --state-path in a "
                  "directory only this user can write)", file=sys.stderr)
            return EXIT_CONFIG
        admin_host = "127.0.0.1"
        where = ({"token_file": str(generated.path)} if cfg.server.admin_port else  # 0: named once bound
                 {"token_dir": str(generated.path.parent)})
        log.warning("admin_api_loopback_only", reason="no admin token configured (--admin-token-file or "
                    "VLM_OPTIMIZER_ADMIN_TOKEN): a generated one is used", admin_port=cfg.server.admin_port, **where)
        on_listening = _publisher(generated)

        async def discard(_: Any) -> None:
            generated.discard()

        admin.on_cleanup.append(discard)
    log.info("serving", host=cfg.server.host, port=cfg.server.port, backend=backend.name,
             strategy=engine.settings.strategy.value, monitoring_interval_s=engine.settings.monitoring_interval,
             admin_port=cfg.server.admin_port, state_path=cfg.server.state_path)
    timeouts = ReadTimeouts(header_s=cfg.server.header_timeout, body_s=cfg.server.body_timeout)
    try:
        asyncio.run(serve_until_signalled(app, cfg.server.host, cfg.server.port, admin, admin_host,
                                          cfg.server.admin_port, timeouts, on_listening))
    except StartupError as exc:
        backend.close()
        if generated is not None:
            generated.discard()  # its temporary file (the one in place, if any, is another server's)
        print(f"vlm-gpu-optimizer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _admin_token(server: ServerSettings,
                 environ: Mapping[str, str] | None = None) -> tuple[bytes, GeneratedToken | None]:
    """The admin bearer token: from ``admin_token_file``, else ``VLM_OPTIMIZER_ADMIN_TOKEN``, else a
    generated one (returned with its unwritten file too). A token file that does not exist counts as none
    given (an optional Kubernetes Secret not created yet), loudly; one that exists but cannot be read, is
    empty or holds no valid token is a :class:`ConfigError`.
    """
    env = os.environ if environ is None else environ
    path = server.admin_token_file
    missing = False
    if path is not None:
        try:
            return read_token_file(Path(path)).encode(), None
        except FileNotFoundError:
            missing = True
        except OSError as exc:
            raise ConfigError("server.admin_token_file", f"cannot read {path}: {exc.strerror or exc}") from exc
        except AccessError as exc:
            raise ConfigError("server.admin_token_file", str(exc)) from exc
    value = env.get(manage.TOKEN_ENV, "").strip()
    if value and not TOKEN_RE.fullmatch(value):
        raise ConfigError(manage.TOKEN_ENV, f"must be {TOKEN_RULE}")
    generated = None if value else GeneratedToken(generated_token_path(server.admin_port, server.state_path, env))
    if missing:
        log.warning("admin_token_file_missing", path=path,
                    detail=f"{path} does not exist; using {manage.TOKEN_ENV}" if value else
                    f"{path} does not exist: a token is generated and the admin API listens on 127.0.0.1 "
                    "only until the file is there and the service restarts")
    return (value.encode(), None) if generated is None else (generated.token.encode(), generated)


def _publisher(generated: GeneratedToken) -> Callable[[int], None]:
    """Put the generated token's file in place once the admin API listens; log where (never the token).

    The file is named for the port the admin API bound, where the management commands look for it: with
    ``--admin-port 0`` that port is known only now."""
    def publish(admin_port: int) -> None:
        generated.path = generated.path.with_name(token_name(admin_port))
        try:
            generated.publish()
        except OSError as exc:
            log.error("admin_token_write_failed", path=str(generated.path), error=exc.strerror or str(exc))
            return
        log.info("admin_token_written", path=str(generated.path),
                 detail="readable by this user only; the management commands read it from there")
    return publish


def _table(result: SimulationResult) -> str:
    head = ["gpu", "service", *MEASURES]
    rows = [head]
    for s in result.services:
        d = s.to_dict()
        rows.append([str(s.gpu), s.service,
                     *(f"{d[m]:.4f}" if m.endswith("ratio") else str(d[m]) for m in MEASURES)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"scenario {result.scenario}, strategy {result.strategy}, {result.duration_s:g} s (virtual)"]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    lines += [f"GPU {g.gpu}: {g.cotenant_failures} co-tenant arrivals failed, {g.seconds_throttled:g} s throttled, "
              f"{g.seconds_above_bound:g} s above the safety bound" for g in result.gpus]
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
        scenario = load_scenario(args.scenario)
        if args.duration is not None and args.duration <= 0:
            raise ConfigError("duration", f"must be > 0 seconds, got {args.duration:g}")
    except (ConfigError, ScenarioError) as exc:
        print(f"vlm-gpu-optimizer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.server.log_format, "error")  # the simulated OOMs are results, not warnings
    result = simulate(scenario, cfg.settings, duration_s=args.duration)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(_table(result))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Strategies against baselines on scenarios (optimizer.benchmark); 2 on a bad flag, like simulate."""
    from optimizer.benchmark.command import run

    return run(args)


def main(argv: Sequence[str] | None = None, *, sleep: Callable[[float], None] = time.sleep) -> int:
    """The entry point. ``sleep`` is what ``monitor`` waits with between polls (tests pass a fake)."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "simulate":
        return cmd_simulate(args)
    if args.command == "benchmark":
        return cmd_benchmark(args)
    return manage.run(args, sleep=sleep)
