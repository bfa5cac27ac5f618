"""``vlm-gpu-optimizer benchmark``: the flags, their checks, and what is written where."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from optimizer.benchmark.baselines import BASELINES
from optimizer.benchmark.report import document, table
from optimizer.benchmark.run import STRATEGIES, ScenarioBenchmark, parse_selection, run_scenario
from optimizer.config import ConfigError, Settings, load_config
from optimizer.logs import configure_logging
from optimizer.simulation.scenario import ScenarioError, load_scenario

EXIT_CONFIG = 2
EXIT_WRITE = 1  # the runs succeeded; their results could not be written
#: Where the shipped scenarios are: examples/scenarios/ of the source tree this package runs from.
EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "scenarios"
DEFAULT_PLOTS = "benchmark-plots"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``benchmark`` subcommand's parser."""
    p = sub.add_parser(
        "benchmark", help="compare the strategies with baselines (fixed, accelerate, Lightning, oracle) on scenarios",
        description="Replay scenarios in virtual time against every strategy and the baselines: fixed batch 4 and "
                    "max_batch_size, accelerate's find_executable_batch_size, Lightning's BatchSizeFinder "
                    "(binsearch), and the oracle. Prints a table per scenario; writes JSON (--output) and a PNG per "
                    "scenario (--plots). See docs/benchmarks.md.")
    p.add_argument("--scenario", metavar="FILE", action="append",
                   help="scenario YAML, repeatable (default: every examples/scenarios/*.yaml of the source tree, "
                        f"{EXAMPLES}, else ./examples/scenarios)")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (thresholds, max_batch_size, profiles)")
    p.add_argument("--duration", metavar="SECONDS", help="length of every scenario (default: each one's duration_s)")
    p.add_argument("--interval", metavar="SECONDS",
                   help="polling interval of the services and the optimizer's sampling interval (default: the "
                        "configuration's monitoring_interval, 5)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON (schema in docs/benchmarks.md)")
    p.add_argument("--plots", metavar="DIR", default=DEFAULT_PLOTS,
                   help=f"directory for a PNG per scenario, SCENARIO.png (default: ./{DEFAULT_PLOTS})")
    p.add_argument("--no-plots", action="store_true", help="write no PNG (and do not import matplotlib)")
    p.add_argument("--strategies", metavar="LIST",
                   help=f"comma-separated strategies to run (default: all: {','.join(STRATEGIES)}; 'none': none)")
    p.add_argument("--baselines", metavar="LIST",
                   help=f"comma-separated baselines to run (default: all: {','.join(BASELINES)}; 'none': none)")
    return p


def _seconds(flag: str, value: str | None, *, most: float = math.inf) -> float | None:
    """A positive number of seconds given to ``flag``, at most ``most``; :class:`ConfigError` naming the flag."""
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        raise ConfigError(flag, f"must be a number of seconds in (0, {most:g}], got {value!r}") from None
    if not 0 < f <= most or not math.isfinite(f):
        raise ConfigError(flag, f"must be a number of seconds in (0, {most:g}], got {value!r}")
    return f


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


def _command_line(args: argparse.Namespace, files: list[str]) -> str:
    words = ["vlm-gpu-optimizer", "benchmark"]
    if args.scenario:
        for f in files:
            words += ["--scenario", f]
    for flag, value in (("--config", args.config), ("--duration", args.duration), ("--interval", args.interval),
                        ("--strategies", args.strategies), ("--baselines", args.baselines),
                        ("--output", args.output)):
        if value is not None:
            words += [flag, str(value)]
    words += ["--no-plots"] if args.no_plots else ["--plots", args.plots]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0, or 2 with a message naming the bad flag or field."""
    try:
        cfg = load_config(args.config)
        settings: Settings = cfg.settings
        duration = _seconds("--duration", args.duration, most=30 * 86400)
        interval = _seconds("--interval", args.interval, most=settings.optimization_interval)
        strategies = parse_selection("--strategies", args.strategies, STRATEGIES)
        baselines = parse_selection("--baselines", args.baselines, BASELINES)
        if not strategies and not baselines:
            raise ConfigError("--strategies", "and --baselines are both none: nothing to run")
        paths = [Path(p) for p in args.scenario] if args.scenario else default_scenarios()
        scenarios = [(_shown(p), load_scenario(p)) for p in paths]
    except (ConfigError, ScenarioError) as exc:
        print(f"vlm-gpu-optimizer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.server.log_format, "warning")
    benches: list[ScenarioBenchmark] = []
    for source, scenario in scenarios:
        bench = run_scenario(scenario, settings, source=source, strategies=strategies, baselines=baselines,
                             duration_s=duration, interval_s=interval)
        benches.append(bench)
        print(table(bench))
        print()
    try:
        if args.output:
            doc = document(benches, command=_command_line(args, [s for s, _ in scenarios]))
            Path(args.output).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.output}", file=sys.stderr)
        if not args.no_plots:
            from optimizer.benchmark.plot import plot_scenario

            for bench in benches:
                path = plot_scenario(bench, Path(args.plots) / f"{bench.scenario.name}.png")
                print(f"wrote {path}", file=sys.stderr)
    except OSError as exc:
        print(f"vlm-gpu-optimizer: cannot write {exc.filename or 'the results'}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_WRITE
    return 0
