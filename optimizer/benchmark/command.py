"""``vlm-gpu-optimizer benchmark``: the flags, their checks, and what is written where."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from optimizer.benchmark import family as fam
from optimizer.benchmark import family_report
from optimizer.benchmark.baselines import BASELINES
from optimizer.benchmark.generate import DURATION_S, MAX_SCENARIOS, GeneratedScenario, generate, write_scenarios
from optimizer.benchmark.report import document, table
from optimizer.benchmark.run import STRATEGIES, Job, parse_selection, run_jobs
from optimizer.config import ConfigError, Settings, load_config
from optimizer.logs import configure_logging
from optimizer.simulation.scenario import OOM_MODES, Scenario, ScenarioError, load_scenario

EXIT_CONFIG = 2
EXIT_WRITE = 1  # the runs succeeded; their results could not be written
#: Where the shipped scenarios are: examples/scenarios/ of the source tree this package runs from.
EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "scenarios"
DEFAULT_PLOTS = "benchmark-plots"
DEFAULT_SCENARIOS_DIR = "benchmark-scenarios"  # generated scenarios go to ./benchmark-scenarios/gen-SEED/
MAX_SEED = 2**32 - 1
MAX_JOBS = 64


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``benchmark`` subcommand's parser."""
    p = sub.add_parser(
        "benchmark", help="compare the strategies with baselines (fixed, accelerate, Lightning, vLLM, oracle) on "
                          "scenario files or on a generated family of random scenarios",
        description="Replay scenarios in virtual time against every strategy and the baselines: fixed batch 4 and "
                    "max_batch_size, accelerate's find_executable_batch_size, Lightning's BatchSizeFinder "
                    "(power and binsearch), a vLLM-style static reservation, and the oracle. With --scenario (or "
                    "by default, the examples) it prints a table per scenario and writes JSON (--output) and a "
                    "PNG per scenario (--plots). With --generate N it draws N random scenarios (a family), writes "
                    "them as YAML (--write-scenarios), prints the family's summary and checks, and writes JSON "
                    "(--output) and one PNG (--plots). See docs/benchmarks.md.")
    p.add_argument("--scenario", metavar="FILE", action="append",
                   help="scenario YAML, repeatable (default: every examples/scenarios/*.yaml of the source tree, "
                        f"{EXAMPLES}, else ./examples/scenarios); not with --generate")
    p.add_argument("--generate", metavar="N",
                   help=f"draw N random scenarios (1 to {MAX_SCENARIOS}) from the distribution in docs/benchmarks.md "
                        "and run them instead of scenario files")
    p.add_argument("--seed", metavar="S",
                   help=f"the family's seed, an integer in [0, {MAX_SEED}] (default 0; only with --generate): the "
                        "same N and seed give the same scenarios")
    p.add_argument("--oom-mode", metavar="MODE",
                   help="recover or crash: what an OOM does to a service (generated scenarios: default recover; "
                        "with --scenario it overrides each file's oom_mode)")
    p.add_argument("--write-scenarios", metavar="DIR",
                   help="where the generated scenarios are written, one YAML per scenario, replayable with "
                        f"--scenario (default: ./{DEFAULT_SCENARIOS_DIR}/gen-S/; only with --generate)")
    p.add_argument("--jobs", metavar="N",
                   help=f"worker processes for the runs, 1 to {MAX_JOBS} (default 1); the results are the same "
                        "whatever N")
    p.add_argument("--tables", action="store_true",
                   help="with --generate, also print the table of every scenario (default: only the summary)")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (thresholds, max_batch_size, profiles)")
    p.add_argument("--duration", metavar="SECONDS",
                   help="length of every scenario (default: each one's duration_s; with --generate, at most and "
                        f"by default {DURATION_S:g})")
    p.add_argument("--interval", metavar="SECONDS",
                   help="polling interval of the services and the optimizer's sampling interval (default: the "
                        "configuration's monitoring_interval, 5)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON (schema in docs/benchmarks.md)")
    p.add_argument("--plots", metavar="DIR", default=DEFAULT_PLOTS,
                   help="directory for a PNG per scenario, SCENARIO.png, or with --generate one PNG of the family, "
                        f"family-S.png (default: ./{DEFAULT_PLOTS})")
    p.add_argument("--no-plots", action="store_true", help="write no PNG (and do not import matplotlib)")
    p.add_argument("--strategies", metavar="LIST",
                   help=f"comma-separated strategies to run (default: all: {','.join(STRATEGIES)}; 'none': none)")
    p.add_argument("--baselines", metavar="LIST",
                   help=f"comma-separated baselines to run (default: all: {','.join(BASELINES)}; 'none': none)")
    return p


def _seconds(flag: str, value: str | None, *, most: float = math.inf, when: str = "") -> float | None:
    """A positive number of seconds given to ``flag``, at most ``most``; :class:`ConfigError` naming the flag.

    ``when`` says in which case the bound applies (``"with --generate, "``).
    """
    if value is None:
        return None
    message = f"{when}must be a number of seconds in (0, {most:g}], got {value!r}"
    try:
        f = float(value)
    except ValueError:
        raise ConfigError(flag, message) from None
    if not 0 < f <= most or not math.isfinite(f):
        raise ConfigError(flag, message)
    return f


def _integer(flag: str, value: str | None, lo: int, hi: int) -> int | None:
    """An integer in ``[lo, hi]`` given to ``flag``; :class:`ConfigError` naming the flag and the range."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(flag, f"must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not lo <= n <= hi:
        raise ConfigError(flag, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return n


def _oom_mode(value: str | None) -> str | None:
    if value is not None and value not in OOM_MODES:
        raise ConfigError("--oom-mode", f"must be one of {', '.join(OOM_MODES)}, got {value!r}")
    return value


def default_scenarios() -> list[Path]:
    """The shipped example scenarios (see :data:`EXAMPLES`); :class:`ConfigError` when there are none."""
    for folder in (EXAMPLES, Path.cwd() / "examples" / "scenarios"):
        found = sorted(folder.glob("*.yaml"))
        if found:
            return found
    raise ConfigError("--scenario", f"no scenario given and none found in {EXAMPLES} or ./examples/scenarios")


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is under it (so results name files portably)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Plan:
    """What the flags ask for, checked: the runs, and with ``--generate`` the family and where it is written."""

    settings: Settings
    strategies: tuple[str, ...]
    baselines: tuple[str, ...]
    duration_s: float | None
    interval_s: float | None
    jobs: int
    oom_mode: str | None
    family: fam.Family | None = None
    scenarios_dir: Path | None = None


def _family(args: argparse.Namespace, oom_mode: str | None) -> tuple[fam.Family | None, Path | None]:
    """The family ``--generate`` and ``--seed`` ask for, and its folder; (None, None) without ``--generate``."""
    n = _integer("--generate", args.generate, 1, MAX_SCENARIOS)
    if n is None:
        for flag, value in (("--seed", args.seed), ("--write-scenarios", args.write_scenarios)):
            if value is not None:
                raise ConfigError(flag, "only with --generate")
        return None, None
    if args.scenario:
        raise ConfigError("--generate", "cannot be combined with --scenario: give one or the other")
    seed = _integer("--seed", args.seed, 0, MAX_SEED)
    seed = 0 if seed is None else seed
    folder = Path(args.write_scenarios) if args.write_scenarios else Path(DEFAULT_SCENARIOS_DIR) / f"gen-{seed}"
    return fam.Family(n=n, seed=seed, oom_mode=oom_mode or "recover"), folder


def plan(args: argparse.Namespace, settings: Settings) -> Plan:
    """Check every flag; :class:`ConfigError` naming the first bad one and what it allows."""
    oom_mode = _oom_mode(args.oom_mode)
    family, folder = _family(args, oom_mode)
    if family is None:
        duration = _seconds("--duration", args.duration, most=30 * 86400)
    else:
        duration = _seconds("--duration", args.duration, most=DURATION_S, when="with --generate, ")
    interval = _seconds("--interval", args.interval, most=settings.optimization_interval)
    strategies = parse_selection("--strategies", args.strategies, STRATEGIES)
    baselines = parse_selection("--baselines", args.baselines, BASELINES)
    if not strategies and not baselines:
        raise ConfigError("--strategies", "and --baselines are both none: nothing to run")
    jobs = _integer("--jobs", args.jobs, 1, MAX_JOBS)
    return Plan(settings=settings, strategies=strategies, baselines=baselines, duration_s=duration,
                interval_s=interval, jobs=1 if jobs is None else jobs, oom_mode=oom_mode, family=family,
                scenarios_dir=folder)


def _files(args: argparse.Namespace, oom_mode: str | None) -> list[tuple[str, Scenario]]:
    """The scenario files to run, loaded (``oom_mode`` replacing theirs when given)."""
    paths = [Path(p) for p in args.scenario] if args.scenario else default_scenarios()
    out = []
    for p in paths:
        sc = load_scenario(p)
        out.append((_shown(p), sc if oom_mode is None else dataclasses.replace(sc, oom_mode=oom_mode)))
    return out


def _command_line(args: argparse.Namespace, files: list[str], p: Plan) -> str:
    """The command that makes the same JSON (``--jobs`` and ``--tables`` left out: they do not change it)."""
    words = ["vlm-gpu-optimizer", "benchmark"]
    if p.family is not None:
        words += ["--generate", str(p.family.n), "--seed", str(p.family.seed), "--oom-mode", p.family.oom_mode,
                  "--write-scenarios", str(p.scenarios_dir)]
    elif args.scenario:
        for f in files:
            words += ["--scenario", f]
    if p.family is None and p.oom_mode is not None:
        words += ["--oom-mode", p.oom_mode]
    for flag, value in (("--config", args.config), ("--duration", args.duration), ("--interval", args.interval),
                        ("--strategies", args.strategies), ("--baselines", args.baselines),
                        ("--output", args.output)):
        if value is not None:
            words += [flag, str(value)]
    words += ["--no-plots"] if args.no_plots else ["--plots", args.plots]
    return shlex.join(words)


def _jobs(scenarios: Sequence[tuple[str, Scenario]], p: Plan, *, record: bool) -> list[Job]:
    return [Job(scenario=sc, settings=p.settings, source=source, strategies=p.strategies, baselines=p.baselines,
                duration_s=p.duration_s if p.family is None else None, interval_s=p.interval_s, record=record)
            for source, sc in scenarios]


def _write_json(path: str, text: str) -> None:
    Path(path).write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


def _run_files(args: argparse.Namespace, p: Plan, scenarios: list[tuple[str, Scenario]], log_format: str) -> int:
    """``--scenario`` (or the examples): a table per scenario, JSON, a PNG per scenario."""
    benches = run_jobs(_jobs(scenarios, p, record=not args.no_plots), workers=p.jobs, log_format=log_format)
    for bench in benches:
        print(table(bench))
        print()
    try:
        if args.output:
            doc = document(benches, command=_command_line(args, [s for s, _ in scenarios], p))
            _write_json(args.output, json.dumps(doc, indent=2))
        if not args.no_plots:
            from optimizer.benchmark.plot import plot_scenario

            for bench in benches:
                path = plot_scenario(bench, Path(args.plots) / f"{bench.scenario.name}.png")
                print(f"wrote {path}", file=sys.stderr)
    except OSError as exc:
        return _write_failed(exc)
    return 0


def _run_family(args: argparse.Namespace, p: Plan, log_format: str) -> int:
    """``--generate``: draw and write the family, run it, print its summary, write JSON and its PNG."""
    assert p.family is not None and p.scenarios_dir is not None
    f = p.family
    drawn: list[GeneratedScenario] = generate(f.n, f.seed, oom_mode=f.oom_mode,
                                              duration_s=DURATION_S if p.duration_s is None else p.duration_s)
    try:
        paths = write_scenarios(drawn, p.scenarios_dir)
    except OSError as exc:
        return _write_failed(exc)
    print(f"wrote {len(paths)} scenarios to {p.scenarios_dir}", file=sys.stderr)
    scenarios = [(_shown(path), g.scenario) for path, g in zip(paths, drawn)]
    benches = run_jobs(_jobs(scenarios, p, record=False), workers=p.jobs, log_format=log_format)
    if args.tables:
        for bench in benches:
            print(table(bench))
            print()
    unavoidable = {g.scenario.name: g.unavoidable_by_gpu for g in drawn}
    summary = fam.summarize(benches, unavoidable, f)
    print(family_report.render(summary))
    try:
        if args.output:
            doc = family_report.document(summary, benches, unavoidable, command=_command_line(args, [], p))
            _write_json(args.output, family_report.dumps(doc))
        if not args.no_plots:
            from optimizer.benchmark.plot import plot_family

            path = plot_family(summary, Path(args.plots) / f"family-{f.seed}.png")
            print(f"wrote {path}", file=sys.stderr)
    except OSError as exc:
        return _write_failed(exc)
    return 0


def _write_failed(exc: OSError) -> int:
    print(f"vlm-gpu-optimizer: cannot write {exc.filename or 'the results'}: {exc.strerror or exc}", file=sys.stderr)
    return EXIT_WRITE


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0, 1 when results cannot be written, or 2 naming a bad flag or field."""
    try:
        cfg = load_config(args.config)
        p = plan(args, cfg.settings)
        scenarios = _files(args, p.oom_mode) if p.family is None else []
    except (ConfigError, ScenarioError) as exc:
        print(f"vlm-gpu-optimizer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.server.log_format, "error")  # the simulated OOMs are results, not warnings
    if p.family is not None:
        return _run_family(args, p, cfg.server.log_format)
    return _run_files(args, p, scenarios, cfg.server.log_format)
