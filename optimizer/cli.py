"""The ``vlm-gpu-optimizer`` command: ``serve`` and ``simulate``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from optimizer import __version__
from optimizer.config import BackendName, Config, ConfigError, Strategy, load_config
from optimizer.logs import configure_logging
from optimizer.simulation.run import MEASURES, SimulationResult, simulate, with_scenario_profiles
from optimizer.simulation.scenario import DEFAULT_SCENARIO, ScenarioError, load_scenario

log = structlog.get_logger("optimizer")

EXIT_CONFIG = 2
EXIT_BACKEND = 3


def _policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (override the config file and VLM_OPTIMIZER_* variables)")
    g.add_argument("--strategy", choices=[s.value for s in Strategy], help="batch-size strategy (default: balanced)")
    g.add_argument("--monitoring-interval", type=float, metavar="SECONDS", help="sampling interval (default: 5)")
    g.add_argument("--optimization-interval", type=float, metavar="SECONDS",
                   help="periodic optimization interval (default: 60)")
    g.add_argument("--max-batch-size", type=int, metavar="N", help="largest batch published (default: 16)")
    g.add_argument("--min-batch-size", type=int, metavar="N", help="smallest batch published (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-gpu-optimizer",
        description="Samples every GPU, applies a batch-size strategy, and publishes a safe batch size per "
                    "VLM service over HTTP (GET /batch-size).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the optimizer service (read API and metrics on --port)",
                           description="Run the sampling loop and the read API (GET /batch-size, POST /reports, "
                                       "/status, /history, /health, /ready, /metrics).")
    serve.add_argument("--config", metavar="FILE", help="YAML configuration (seed MemoryConfig keys at top level)")
    serve.add_argument("--backend", choices=[b.value for b in BackendName],
                       help="GPU backend: nvml, simulated (needs no GPU), none (CPU-only host), or auto "
                            "(nvml when NVML initialises, else none; the default)")
    serve.add_argument("--scenario", metavar="FILE",
                       help="scenario for --backend simulated (default: one simulated H100 80GB with one service)")
    serve.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port of the read API and /metrics (default: 8080)")
    serve.add_argument("--log-format", choices=["auto", "json", "console"],
                       help="log format (default: auto: console on a terminal, else JSON)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: info")
    _policy_flags(serve)

    sim = sub.add_parser("simulate", help="replay a scenario in virtual time and print per-service measures",
                         description="Replay a scenario through the same policy as serve, in virtual time, and "
                                     "print per service: " + ", ".join(MEASURES) + ".")
    sim.add_argument("--scenario", metavar="FILE", required=True, help="scenario YAML (see docs/scenarios.md)")
    sim.add_argument("--config", metavar="FILE", help="YAML configuration")
    sim.add_argument("--duration", type=float, metavar="SECONDS", help="override the scenario's duration_s")
    sim.add_argument("--json", action="store_true", help="print JSON: an object per service under the measures")
    _policy_flags(sim)
    sim.add_argument("--interval", dest="monitoring_interval", type=float, metavar="SECONDS",
                     help="the services' polling and the optimizer's sampling interval "
                          "(the same as --monitoring-interval)")
    return parser


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("strategy", "monitoring_interval", "optimization_interval", "max_batch_size", "min_batch_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _load(args: argparse.Namespace, server: dict[str, Any] | None = None) -> Config:
    return load_config(args.config, cli_settings=_cli_settings(args), cli_server=server or {})


def cmd_serve(args: argparse.Namespace) -> int:
    server_flags = {k: getattr(args, k) for k in ("backend", "scenario", "host", "port", "log_format", "log_level")
                    if getattr(args, k) is not None}
    try:
        cfg = _load(args, server_flags)
    except ConfigError as exc:
        print(f"vlm-gpu-optimizer: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.server.log_format, cfg.server.log_level)
    from aiohttp import web

    from optimizer.api import build_app
    from optimizer.engine import Engine
    from optimizer.gpu.factory import make_hardware_backend
    from optimizer.gpu.simulated import SimulatedBackend
    from optimizer.gpu.types import BackendError, GpuBackend
    from optimizer.sampler import Sampler
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
            return EXIT_BACKEND
        engine = Engine(settings)
        engine.has_gpus = backend.name != "none"
    sampler = Sampler(backend, engine)
    app = build_app(engine, sampler)
    log.info("serving", host=cfg.server.host, port=cfg.server.port, backend=backend.name,
             strategy=settings.strategy.value, monitoring_interval_s=settings.monitoring_interval)
    web.run_app(app, host=cfg.server.host, port=cfg.server.port, print=None, access_log=None)
    return 0


def _table(result: SimulationResult) -> str:
    head = ["service", *MEASURES]
    rows = [head]
    for s in result.services:
        d = s.to_dict()
        rows.append([s.service, *(f"{d[m]:.4f}" if m.endswith("ratio") else str(d[m]) for m in MEASURES)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"scenario {result.scenario}, strategy {result.strategy}, {result.duration_s:g} s (virtual)"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
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
    configure_logging(cfg.server.log_format, "warning")
    result = simulate(scenario, cfg.settings, duration_s=args.duration)
    if args.json:
        out = {"scenario": result.scenario, "strategy": result.strategy, "duration_s": result.duration_s,
               "services": {s.service: s.to_dict() for s in result.services}}
        print(json.dumps(out, indent=2))
    else:
        print(_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    return cmd_simulate(args)
