"""The benchmark: each baseline's behaviour in the simulated world, the runner, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optimizer.benchmark import run as benchmark_run

from optimizer.benchmark.baselines import (
    ACCELERATE_FACTOR,
    BASELINES,
    FIXED_BATCH,
    LIGHTNING_MARGIN,
    LightningLink,
    _Search,
    make_link,
)
from optimizer.benchmark.command import default_scenarios
from optimizer.benchmark.generate import generate
from optimizer.benchmark.report import COLUMNS, scenario_document
from optimizer.benchmark.run import STRATEGIES, Run, run_baseline, run_scenario, settings_for
from optimizer.cli import main
from optimizer.config import Settings, Strategy
from optimizer.simulation.backend import limits_from
from optimizer.simulation.run import simulate
from optimizer.simulation.physics import BACKOFF_INITIAL_S
from optimizer.simulation.scenario import Background, Scenario, SimGpu, SimService, load_scenario
from optimizer.simulation.world import World
from tests.policy_helpers import ROOT

BASE_MB = 18000.0
PER_ITEM_MB = 3200.0
COTENANT = str(ROOT / "examples/scenarios/cotenant-spike.yaml")


def scenario(*, total_mb: float = 60000, noise: float = 0.0, background: tuple[Background, ...] = (),
             duration_s: float = 900, fragmentation: float = 0.0, services: int = 1) -> Scenario:
    """One GPU, ``services`` VLM services of BASE_MB + PER_ITEM_MB per item (no jitter by default)."""
    return Scenario(
        name="bench-test", seed=5, duration_s=duration_s, step_s=1.0,
        gpus=(SimGpu(index=0, name="Simulated GPU", total_mb=total_mb),),
        services=tuple(SimService(name=f"vlm{i}" if i else "vlm", gpu=0, base_mb=BASE_MB, per_item_mb=PER_ITEM_MB,
                                  item_ms=45, overhead_ms=120, noise=noise,
                                  fragmentation_growth_per_min=fragmentation, load_s=0.0) for i in range(services)),
        background=background,
    )


def largest_fit(total_mb: float, background_mb: float = 0.0) -> int:
    """The largest batch of the noiseless service that fits the GPU (what the world's OOM rule allows)."""
    return math.floor((total_mb - background_mb - BASE_MB) / PER_ITEM_MB)


def sizes(run: Run, service: str = "vlm") -> list[int]:
    (svc,) = [s for s in run.services if s.service == service]
    return [b for _, b in svc.batches]


# --------------------------------------------------------------------------- fixed


def test_fixed_baselines_never_change_their_batch() -> None:
    settings = Settings(max_batch_size=10)
    # 10 items fit alone (18000 + 10 * 3200 of 60000); an 8 GB co-tenant fits in what is free, and then
    # the jitter of ten items no longer does.
    sc = scenario(noise=0.1, background=(Background(gpu=0, at_s=300, mb=8000, for_s=300),))
    four = run_baseline("fixed-4", sc, settings, 900)
    most = run_baseline("fixed-max", sc, settings, 900)
    assert sizes(four) == [FIXED_BATCH]
    assert sizes(most) == [settings.max_batch_size]
    assert four.services[0].batch_changes == most.services[0].batch_changes == 0
    assert largest_fit(60000) >= 10 > largest_fit(60000, 8000) - 1
    assert most.services[0].ooms > 0 and four.services[0].ooms == 0
    assert {t for t, _, _ in most.trace.ooms} <= set(range(300, 600))


def test_a_fixed_batch_keeps_a_cotenant_out_when_it_does_not_fit() -> None:
    sc = scenario(background=(Background(gpu=0, at_s=300, mb=20000, for_s=300),))
    most = run_baseline("fixed-max", sc, Settings(max_batch_size=10), 900)
    (gpu,) = most.gpus
    assert most.services[0].ooms == 0 and gpu.cotenant_failures > 0  # it tried, backed off, tried again


# --------------------------------------------------------------------------- accelerate


def test_accelerate_starts_at_128_within_max_batch_size() -> None:
    assert sizes(run_baseline("accelerate", scenario(total_mb=1e7), Settings(max_batch_size=512), 60)) == [128]
    assert sizes(run_baseline("accelerate", scenario(total_mb=1e7), Settings(max_batch_size=40), 60)) == [40]


def test_accelerate_shrinks_by_a_tenth_on_each_oom_and_never_grows() -> None:
    settings = Settings(max_batch_size=64)
    sc = scenario(background=(Background(gpu=0, at_s=0, mb=10000, for_s=300),))
    run = run_baseline("accelerate", sc, settings, 900)
    expected = [64]
    while expected[-1] > largest_fit(60000, 10000):  # next to the co-tenant
        expected.append(int(expected[-1] * ACCELERATE_FACTOR))
    assert sizes(run) == expected  # 64, 57, 51, ..., 9
    assert run.services[0].ooms == len(expected) - 1
    assert run.services[0].final_batch_size == expected[-1] < largest_fit(60000)  # it left: no growth


def test_accelerate_gives_up_at_zero() -> None:
    run = run_baseline("accelerate", scenario(total_mb=BASE_MB + PER_ITEM_MB / 2), Settings(), 120)
    assert sizes(run)[-1] == 0 and run.services[0].items == 0.0
    assert run.services[0].ooms == len(sizes(run)) - 1  # one OOM per reduction, none at 0


def test_a_crashed_accelerate_service_starts_over() -> None:
    sc = dataclasses.replace(scenario(), oom_mode="crash", restart_s=10.0)
    run = run_baseline("accelerate", sc, Settings(), 600)
    # 16 does not fit (13 does): each process tries 16, crashes, and its successor tries 16 again.
    assert sizes(run) == [16] and run.services[0].restarts == run.services[0].ooms > 3
    assert run.services[0].items == 0.0


# --------------------------------------------------------------------------- lightning


def lightning_run(mode: str, sc: Scenario, settings: Settings, duration: float) -> tuple[World, _Search]:
    world = World(sc, limits=limits_from(settings), poll_interval=settings.monitoring_interval)
    link = make_link(mode, settings, world)
    world.advance_to(duration, link)
    assert isinstance(link, LightningLink)
    return world, link.searches[(0, "vlm")]


def test_lightning_binsearch_finds_the_largest_fit_then_keeps_it_with_a_margin() -> None:
    settings = Settings()
    late = Background(gpu=0, at_s=600, mb=12000)  # after the search, for good
    world, search = lightning_run("lightning-binsearch", scenario(background=(late,)), settings, 900)
    fit = largest_fit(60000)
    tried = [size for _, size, _ in search.trials]
    assert tried[:4] == [2, 4, 8, 16]  # doubles from init_val 2 until the OOM
    assert all(ok == (size <= fit) for _, size, ok in search.trials)  # trials fail exactly when they do not fit
    assert search.found == int(fit * (1 - LIGHTNING_MARGIN))
    (run,) = world.runs
    trial_ooms = sum(1 for _, _, ok in search.trials if not ok)
    assert run.batch == search.found and run.ooms == trial_ooms  # it does not adapt: the co-tenant is kept out
    assert world.gpu_runs[0].cotenant_failures > 0 and search.found > largest_fit(60000, late.mb)


def test_lightning_power_mode_keeps_half_the_size_that_failed() -> None:
    world, search = lightning_run("lightning", scenario(), Settings(), 300)
    assert [(size, ok) for _, size, ok in search.trials] == [(2, True), (4, True), (8, True), (16, False)]
    assert search.found == 8 == world.runs[0].batch  # no margin in power mode


def test_lightning_power_mode_stops_at_max_batch_size() -> None:
    _, search = lightning_run("lightning", scenario(total_mb=1e6), Settings(max_batch_size=12), 300)
    assert [size for _, size, _ in search.trials] == [2, 4, 8, 12] and search.found == 12


def test_lightning_searched_next_to_a_cotenant_stays_small_after_it_leaves() -> None:
    sc = scenario(background=(Background(gpu=0, at_s=0, mb=20000, for_s=120),))
    run = run_baseline("lightning-binsearch", sc, Settings(), 900)
    kept = int(largest_fit(60000, 20000) * (1 - LIGHTNING_MARGIN))
    assert run.services[0].final_batch_size == kept < largest_fit(60000)
    assert "kept" in run.notes["vlm"]
    power = run_baseline("lightning", sc, Settings(), 900)
    assert power.services[0].final_batch_size == 4 < kept  # 2, 4, then 8 failed


def test_a_crashed_lightning_service_searches_again() -> None:
    sc = dataclasses.replace(scenario(), oom_mode="crash", restart_s=10.0)
    run = run_baseline("lightning", sc, Settings(), 600)
    assert run.services[0].restarts >= 2
    assert run.notes["vlm"].startswith("searched 2 4 8 16✗")  # the search it was in when the run ended


# --------------------------------------------------------------------------- vllm


def test_vllm_reserves_nine_tenths_and_sizes_its_batch_once_for_the_worst_item() -> None:
    run = run_baseline("vllm", scenario(noise=0.05, total_mb=60000), Settings(max_batch_size=64), 600)
    (svc,) = run.services
    # (0.9 * 60000 - 18000) / (3200 * 1.05) = 10.7: ten items, held from the start to the end
    assert svc.ooms == 0 and sizes(run) == [10]
    assert max(u for _, u in run.trace.used_mb[0]) == pytest.approx(54000)  # the reservation, held whole
    assert min(u for t, u in run.trace.used_mb[0] if t >= 1) == pytest.approx(54000)


def test_vllm_runs_what_fits_when_its_items_outgrow_the_reservation() -> None:
    sc = scenario(total_mb=60000)
    sc = dataclasses.replace(sc, services=(dataclasses.replace(sc.services[0], per_item_changes=((300.0, 4000.0),)),))
    run = run_baseline("vllm", sc, Settings(max_batch_size=64), 600)
    (svc,) = run.services
    assert svc.ooms == 0 and sizes(run) == [11]  # (54000 - 18000) / 3200 = 11.25
    after = svc.items - run_baseline("vllm", sc, Settings(max_batch_size=64), 300).services[0].items
    assert after == pytest.approx(300 * 9 / (120 + 9 * 45) * 1000, rel=1e-6)  # 36000 / 4000 = 9 items run


def test_vllm_refuses_to_start_while_a_cotenant_holds_its_share() -> None:
    sc = scenario(background=(Background(gpu=0, at_s=0, mb=20000, for_s=100),))
    run = run_baseline("vllm", sc, Settings(), 600)
    (svc,) = run.services
    # At 0 the co-tenant takes its 20 GB first: the pool no longer fits. Back after 10 s of back-off and
    # 60 s of start-up, less than 0.9 of the GPU is free: the start-up check fails. At 151 s it starts.
    assert svc.restarts == 2 and svc.seconds_down == 151
    assert svc.items > 0


def test_vllm_splits_its_fraction_by_weight_on_a_shared_gpu() -> None:
    sc = scenario(total_mb=100000, services=2)
    sc = dataclasses.replace(sc, services=(sc.services[0], dataclasses.replace(sc.services[1], weight=3.0)))
    run = run_baseline("vllm", sc, Settings(), 60)
    assert max(u for _, u in run.trace.used_mb[0]) == pytest.approx(90000)
    assert all(s.ooms == 0 and s.items > 0 for s in run.services)


# --------------------------------------------------------------------------- oracle


def test_oracle_items_equal_the_worlds_oracle_measure() -> None:
    sc = scenario(noise=0.05, fragmentation=0.5, services=2,
                  background=(Background(gpu=0, at_s=200, mb=15000, ramp_s=30, for_s=300),))
    run = run_baseline("oracle", sc, Settings(), 900)
    for svc in run.services:
        assert svc.items == pytest.approx(svc.oracle_items, rel=1e-12)
        assert svc.ooms == 0
    assert run.poll_interval_s == sc.step_s


# --------------------------------------------------------------------------- the runner


def test_strategies_run_through_simulate_unchanged() -> None:
    sc = scenario(noise=0.05, background=(Background(gpu=0, at_s=200, mb=15000, for_s=300),))
    bench = run_scenario(sc, Settings(), strategies=("balanced",), baselines=())
    direct = simulate(sc, Settings(), strategy=Strategy.BALANCED, duration_s=900)
    assert bench.runs[0].services[0].items == direct.services[0].items
    assert bench.runs[0].services[0].batches == direct.services[0].batches
    assert len(bench.runs[0].trace.used_mb[0]) == 900  # one memory sample per step, for the plot


def test_the_same_scenario_and_seed_give_the_same_numbers() -> None:
    sc = scenario(noise=0.05, fragmentation=0.01, background=(Background(gpu=0, at_s=100, mb=15000, for_s=200),))
    first = scenario_document(run_scenario(sc, Settings(), duration_s=400))
    second = scenario_document(run_scenario(sc, Settings(), duration_s=400))
    assert first == second
    assert [r["name"] for r in first["runs"]] == [*STRATEGIES, *BASELINES]


def test_default_scenarios_are_the_examples() -> None:
    assert default_scenarios() == sorted((ROOT / "examples" / "scenarios").glob("*.yaml"))


# --------------------------------------------------------------------------- the command line


def test_benchmark_cli_prints_tables_and_writes_json_and_png(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    assert main(["benchmark", "--scenario", COTENANT, "--duration", "1200", "--interval", "10",
                 "--output", str(out), "--plots", str(plots)]) == 0
    text = capsys.readouterr().out
    assert "scenario cotenant-spike (seed 23): 1200 s virtual, services poll every 10 s" in text
    for name in (*STRATEGIES, *BASELINES):
        assert f"\n{name} " in text

    doc = json.loads(out.read_text())
    assert doc["format"] == "vlm-gpu-optimizer-benchmark" and doc["measures"] == list(COLUMNS)
    assert "--duration 1200" in doc["command"] and "--interval 10" in doc["command"]
    (sc,) = doc["scenarios"]
    assert (sc["scenario"], sc["duration_s"], sc["interval_s"], sc["seed"]) == ("cotenant-spike", 1200.0, 10.0, 23)
    runs = {r["name"]: r for r in sc["runs"]}
    assert list(runs) == [*STRATEGIES, *BASELINES]
    assert {runs[n]["kind"] for n in STRATEGIES} == {"strategy"}
    oracle = runs["oracle"]["services"][0]
    assert oracle["vs_oracle"] == 1.0 and oracle["ooms"] == 0
    for run in runs.values():
        (svc,) = run["services"]
        assert set(COLUMNS) <= set(svc) and svc["service"] == "vlm"
        assert svc["ratio"] == pytest.approx(svc["items"] / svc["oracle_items"], abs=1e-4)
        assert svc["vs_oracle"] == pytest.approx(svc["items"] / oracle["items"], abs=1e-4)
    assert runs["fixed-4"]["services"][0]["final_batch_size"] == FIXED_BATCH
    # The co-tenant (22 GB from 900 s, ramping over 20 s) takes what is free: fixed-max then loses batches.
    assert runs["fixed-max"]["services"][0]["ooms"] > 0 == runs["balanced"]["services"][0]["ooms"]

    png = plots / "cotenant-spike.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert width > 400 and height > 200


@pytest.mark.parametrize(("flags", "named"), [
    (["--duration", "0"], "--duration"),
    (["--duration", "soon"], "--duration"),
    (["--interval", "120"], "--interval"),  # above optimization_interval (60 s)
    (["--strategies", "balanced,greedy"], "--strategies"),
    (["--baselines", "oracle,deepspeed"], "--baselines"),
    (["--strategies", "none", "--baselines", "none"], "--strategies"),
    (["--scenario", "missing.yaml"], "scenario"),
])
def test_bad_flags_exit_2_naming_the_flag(flags: list[str], named: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark", "--scenario", COTENANT, "--plots", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err
    if named in ("--strategies", "--baselines") and "none" not in flags:
        assert "conservative, balanced" in err or "fixed-4, fixed-max" in err  # the allowed values
    assert not list(tmp_path.iterdir())  # nothing written


def test_no_plots_and_a_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plots = tmp_path / "plots"
    assert main(["benchmark", "--scenario", COTENANT, "--duration", "60", "--strategies", "adaptive",
                 "--baselines", "none", "--plots", str(plots), "--no-plots"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert rows == ["adaptive"] and not plots.exists()


def test_the_cli_does_not_import_matplotlib() -> None:
    code = "import sys, optimizer.cli as c; c.build_parser(); print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------------- scenario families


def test_generate_prints_the_summary_and_writes_json_scenarios_and_png(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, folder, plots = tmp_path / "family.json", tmp_path / "scenarios", tmp_path / "plots"
    assert main(["benchmark", "--generate", "3", "--seed", "7", "--duration", "300", "--output", str(out),
                 "--write-scenarios", str(folder), "--plots", str(plots)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("family gen-7: 3 scenarios, oom_mode recover; ")
    assert "\nchecks: " in text and "  a.median " in text and "  n/a   c.crash " in text
    assert "scenario gen-7-0000" not in text  # no per-scenario tables without --tables

    drawn = generate(3, 7, duration_s=300.0)
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"gen-7-000{i}.yaml" for i in range(3)]
    assert [load_scenario(f) for f in files] == [g.scenario for g in drawn]

    doc = json.loads(out.read_text())
    assert doc["format"] == "vlm-gpu-optimizer-benchmark-family"
    assert doc["family"] == {"n": 3, "seed": 7, "oom_mode": "recover", "duration_s": 300.0, "interval_s": 5.0}
    assert "--generate 3 --seed 7 --oom-mode recover" in doc["command"] and "--jobs" not in doc["command"]
    assert [s["scenario"] for s in doc["scenarios"]] == [g.scenario.name for g in drawn]
    for s, g in zip(doc["scenarios"], drawn):
        assert s["unavoidable_ooms"] == g.unavoidable_ooms and Path(s["file"]).name == f"{g.scenario.name}.yaml"
        assert list(s["runs"]) == [*STRATEGIES, *BASELINES]
        assert [(row[0], row[1]) for row in s["runs"]["adaptive"]] == [(x.gpu, x.name) for x in g.scenario.services]
    assert [r["name"] for r in doc["summary"]["runs"]] == [*STRATEGIES, *BASELINES]
    assert [c["key"] for c in doc["checks"]] == ["a.median", "a.p10", "a.min", "a.ooms_within", "a.ooms_excess",
                                                 "b.dominance", "b.oracle", "c.crash"]
    png = plots / "family-7.png"
    assert [p.name for p in plots.iterdir()] == ["family-7.png"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A written file replays with --scenario to the same numbers.
    replay = tmp_path / "replay.json"
    assert main(["benchmark", "--scenario", str(files[1]), "--strategies", "adaptive", "--baselines", "accelerate",
                 "--no-plots", "--output", str(replay)]) == 0
    runs = {r["name"]: r["services"] for r in json.loads(replay.read_text())["scenarios"][0]["runs"]}
    for name in ("adaptive", "accelerate"):
        assert [[s["items"], s["ooms"]] for s in runs[name]] == [
            [row[2], row[4]] for row in doc["scenarios"][1]["runs"][name]]


def test_the_results_do_not_depend_on_the_number_of_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "family.json"
    flags = ["benchmark", "--generate", "4", "--seed", "3", "--oom-mode", "crash", "--duration", "240", "--tables",
             "--write-scenarios", str(tmp_path / "scenarios"), "--no-plots", "--output", str(out)]
    assert main([*flags, "--jobs", "1"]) == 0
    one, one_text = out.read_bytes(), capsys.readouterr().out
    assert main([*flags, "--jobs", "2"]) == 0
    assert out.read_bytes() == one and capsys.readouterr().out == one_text
    assert "scenario gen-3-0003 (seed " in one_text  # --tables: every scenario's table too
    assert json.loads(one)["family"]["oom_mode"] == "crash"


def test_generated_scenarios_go_to_a_folder_named_for_the_seed_by_default(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["benchmark", "--generate", "2", "--seed", "5", "--duration", "60", "--strategies", "adaptive",
                 "--baselines", "none", "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "benchmark-scenarios" / "gen-5").iterdir()) == [
        "gen-5-0000.yaml", "gen-5-0001.yaml"]


def test_oom_mode_overrides_the_scenario_files(tmp_path: Path) -> None:
    out = tmp_path / "results.json"

    def fixed_max(*mode: str) -> dict[str, Any]:
        assert main(["benchmark", "--scenario", COTENANT, "--duration", "1200", "--strategies", "none",
                     "--baselines", "fixed-max", "--no-plots", "--output", str(out), *mode]) == 0
        doc = json.loads(out.read_text())
        return {"command": doc["command"], **doc["scenarios"][0]["runs"][0]["services"][0]}

    recover, crash = fixed_max(), fixed_max("--oom-mode", "crash")
    assert recover["ooms"] > 0 and recover["restarts"] == 0  # the file's oom_mode: recover
    assert crash["restarts"] == crash["ooms"] > 0 and "--oom-mode crash" in crash["command"]


def test_in_crash_mode_an_oom_costs_a_restart_unless_the_configuration_says_otherwise() -> None:
    sc = dataclasses.replace(scenario(), oom_mode="crash", restart_s=40.0,
                             services=tuple(dataclasses.replace(s, load_s=15.0 + i) for i, s in enumerate(scenario().services)))
    longest = max(s.load_s for s in sc.services)
    assert settings_for(sc, Settings()).oom_cost_s == 40.0 + BACKOFF_INITIAL_S + longest
    assert settings_for(sc, Settings(oom_cost_s=5.0)).oom_cost_s == 5.0  # an operator's figure stands


def test_every_scenario_passes_through_the_settings_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sc = scenario()
    assert settings_for(sc, Settings()) == Settings()  # recover mode: the settings as they are
    seen: list[str] = []

    def smaller(scenario: Scenario, settings: Settings) -> Settings:
        seen.append(scenario.name)
        return dataclasses.replace(settings, max_batch_size=3)

    monkeypatch.setattr(benchmark_run, "settings_for", smaller)
    out = tmp_path / "results.json"
    assert main(["benchmark", "--scenario", COTENANT, "--duration", "60", "--strategies", "none",
                 "--baselines", "fixed-max", "--no-plots", "--output", str(out)]) == 0
    assert seen == ["cotenant-spike"]
    assert json.loads(out.read_text())["scenarios"][0]["runs"][0]["services"][0]["final_batch_size"] == 3


@pytest.mark.parametrize(("flags", "message"), [
    (["--generate", "0"], "--generate: must be an integer in [1, 10000], got '0'"),
    (["--generate", "10001"], "--generate: must be an integer in [1, 10000], got '10001'"),
    (["--generate", "many"], "--generate: must be an integer in [1, 10000], got 'many'"),
    (["--generate", "3", "--seed", "-1"], "--seed: must be an integer in [0, 4294967295], got '-1'"),
    (["--generate", "3", "--seed", "x"], "--seed: must be an integer in [0, 4294967295], got 'x'"),
    (["--seed", "3"], "--seed: only with --generate"),
    (["--write-scenarios", "elsewhere"], "--write-scenarios: only with --generate"),
    (["--generate", "3", "--oom-mode", "explode"], "--oom-mode: must be one of recover, crash, got 'explode'"),
    (["--scenario", COTENANT, "--oom-mode", "Crash"], "--oom-mode: must be one of recover, crash, got 'Crash'"),
    (["--generate", "3", "--jobs", "0"], "--jobs: must be an integer in [1, 64], got '0'"),
    (["--scenario", COTENANT, "--jobs", "lots"], "--jobs: must be an integer in [1, 64], got 'lots'"),
    (["--generate", "3", "--scenario", COTENANT], "--generate: cannot be combined with --scenario"),
    (["--generate", "3", "--duration", "7200"],
     "--duration: with --generate, must be a number of seconds in (0, 3600], got '7200'"),
])
def test_bad_family_flags_exit_2_naming_the_flag_and_write_nothing(
        flags: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default folders for plots and scenarios are here
    assert main(["benchmark", *flags, "--output", "out.json"]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
