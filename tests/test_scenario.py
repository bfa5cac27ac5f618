"""Tests for scenario files (``optimizer/simulation/scenario.py``).

"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from optimizer.config import ServiceProfile
from optimizer.simulation.scenario import (
    DEFAULT_SCENARIO,
    Background,
    Scenario,
    ScenarioError,
    SimGpu,
    SimService,
    Thermal,
    load_scenario,
    parse_scenario,
    ramped,
    scenario_to_dict,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

FULL_YAML = """\
name: two-gpus
seed: 42
duration_s: 600
step_s: 0.5
gpus:
  - index: 0
    name: GPU zero
    total_mb: 81559
    idle_temperature_c: 30
    power_limit_w: 700
    load_temperature_rise_c: 25
    uuid: GPU-0000
  - index: 3
    total_mb: 40960
services:
  - name: llava
    gpu: 3
    base_mb: 18000
    per_item_mb: 3200
    item_ms: 45
    overhead_ms: 120
    noise: 0.05
    fragmentation_growth_per_min: 0.002
    declared_per_item_mb: 2800
    start_s: 10
    weight: 2
  - name: qwen
    base_mb: 9000
    per_item_mb: 1500
    item_ms: 20
background:
  - gpu: 0
    at_s: 100
    mb: 20000
    ramp_s: 30
  - gpu: 3
    at_s: 200
    mb: 1000
    for_s: 60
thermal:
  - gpu: 0
    at_s: 300
    celsius: 15
    for_s: 120
    ramp_s: 60
"""


def minimal() -> dict[str, Any]:
    """A small valid scenario as parsed YAML, for tests to break one field at a time."""
    return {
        "name": "mini",
        "duration_s": 60,
        "gpus": [{"index": 0, "total_mb": 80000}, {"index": 1, "total_mb": 40000}],
        "services": [
            {"name": "a", "gpu": 0, "base_mb": 1000, "per_item_mb": 100, "item_ms": 10},
            {"name": "b", "gpu": 1, "base_mb": 1000, "per_item_mb": 100, "item_ms": 10},
        ],
    }


def error_for(raw: Any) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    return info.value


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- parsing


def test_full_scenario_parses(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, FULL_YAML))
    assert sc.name == "two-gpus"
    assert sc.seed == 42
    assert sc.duration_s == 600.0
    assert sc.step_s == 0.5
    assert sc.gpus == (
        SimGpu(index=0, name="GPU zero", total_mb=81559, idle_temperature_c=30, power_limit_w=700,
               load_temperature_rise_c=25, uuid="GPU-0000"),
        SimGpu(index=3, name="Simulated GPU", total_mb=40960),
    )
    assert sc.gpu(3).total_mb == 40960
    with pytest.raises(KeyError):
        sc.gpu(1)

    llava, qwen = sc.services
    assert llava == SimService(
        name="llava", gpu=3, base_mb=18000, per_item_mb=3200, item_ms=45, overhead_ms=120, noise=0.05,
        fragmentation_growth_per_min=0.002, declared_per_item_mb=2800, start_s=10, weight=2,
    )
    assert llava.declared == 2800
    # Omitted fields take their defaults; the GPU defaults to the first declared one.
    assert qwen == SimService(name="qwen", gpu=0, base_mb=9000, per_item_mb=1500, item_ms=20, overhead_ms=0.0)
    assert qwen.noise == 0.0
    assert qwen.fragmentation_growth_per_min == 0.0
    assert qwen.start_s == 0.0
    assert qwen.weight == 1.0
    assert qwen.declared_per_item_mb is None
    assert qwen.declared == 1500

    assert sc.background == (
        Background(gpu=0, at_s=100, mb=20000, for_s=None, ramp_s=30),
        Background(gpu=3, at_s=200, mb=1000, for_s=60, ramp_s=0.0),
    )
    assert sc.thermal == (Thermal(gpu=0, at_s=300, celsius=15, for_s=120, ramp_s=60),)


def test_defaults_apply() -> None:
    sc = parse_scenario(minimal())
    assert sc.step_s == 1.0
    assert sc.seed == 0
    assert sc.background == ()
    assert sc.thermal == ()
    for svc in sc.services:
        assert svc.noise == 0.0
        assert svc.declared_per_item_mb is None
        assert svc.declared == svc.per_item_mb == 100
    gpu = sc.gpus[0]
    assert (gpu.name, gpu.idle_temperature_c, gpu.power_limit_w, gpu.load_temperature_rise_c, gpu.uuid) == (
        "Simulated GPU", 35.0, 700.0, 30.0, None,
    )


def test_gpu_index_defaults_to_position() -> None:
    raw = minimal()
    raw["gpus"] = [{"total_mb": 1000}, {"total_mb": 2000}]
    sc = parse_scenario(raw)
    assert [g.index for g in sc.gpus] == [0, 1]


def test_parse_does_not_mutate_input() -> None:
    raw = minimal()
    before = copy.deepcopy(raw)
    parse_scenario(raw)
    assert raw == before


def test_declared_property() -> None:
    svc = SimService(name="s", gpu=0, base_mb=0, per_item_mb=300, item_ms=1, overhead_ms=0)
    assert svc.declared == 300
    assert SimService(name="s", gpu=0, base_mb=0, per_item_mb=300, item_ms=1, overhead_ms=0,
                      declared_per_item_mb=250).declared == 250


# --------------------------------------------------------------------------- ramps


def test_ramped_before_start_is_zero() -> None:
    assert ramped(9.999, 10, None, 5, 100) == 0.0
    assert ramped(0, 10, 20, 0, 100) == 0.0


def test_ramped_is_linear_during_ramp() -> None:
    assert ramped(10, 10, None, 20, 100) == 0.0
    assert ramped(15, 10, None, 20, 100) == pytest.approx(25.0)
    assert ramped(20, 10, None, 20, 100) == pytest.approx(50.0)
    assert ramped(29, 10, None, 20, 100) == pytest.approx(95.0)


def test_ramped_full_after_ramp() -> None:
    assert ramped(30, 10, None, 20, 100) == 100
    assert ramped(1e6, 10, None, 20, 100) == 100


def test_ramped_without_ramp_is_a_step() -> None:
    assert ramped(10, 10, None, 0, 100) == 100
    assert ramped(10, 10, 5, 0, 100) == 100


def test_ramped_ends_after_for_s() -> None:
    assert ramped(14.9, 10, 5, 0, 100) == 100
    assert ramped(15, 10, 5, 0, 100) == 0.0
    assert ramped(100, 10, 5, 0, 100) == 0.0
    # for_s shorter than the ramp: cut off mid-ramp.
    assert ramped(12, 10, 4, 8, 80) == pytest.approx(20.0)
    assert ramped(14, 10, 4, 8, 80) == 0.0


def test_ramped_for_none_stays() -> None:
    assert ramped(10 + 1e9, 10, None, 0, 7) == 7


def test_background_and_thermal_level() -> None:
    bg = Background(gpu=0, at_s=100, mb=20000, ramp_s=30)
    assert bg.level(0) == 0.0
    assert bg.level(99.9) == 0.0
    assert bg.level(115) == pytest.approx(10000.0)
    assert bg.level(130) == 20000
    assert bg.level(10_000) == 20000  # for_s None: stays
    short = Background(gpu=0, at_s=200, mb=1000, for_s=60)
    assert short.level(199) == 0.0
    assert short.level(200) == 1000
    assert short.level(259) == 1000
    assert short.level(260) == 0.0
    th = Thermal(gpu=0, at_s=300, celsius=15, for_s=120, ramp_s=60)
    assert th.level(330) == pytest.approx(7.5)
    assert th.level(400) == 15
    assert th.level(420) == 0.0


def test_parsed_background_levels(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, FULL_YAML))
    ramping, brief = sc.background
    assert ramping.for_s is None
    assert ramping.level(115) == pytest.approx(10000.0)
    assert ramping.level(5000) == 20000
    assert brief.level(230) == 1000
    assert brief.level(260) == 0.0


# --------------------------------------------------------------------------- errors


def test_negative_per_item_mb() -> None:
    raw = minimal()
    raw["services"][0]["per_item_mb"] = -1
    err = error_for(raw)
    assert err.field == "services[0].per_item_mb"
    assert "-1" in str(err)
    assert str(err).startswith("services[0].per_item_mb: ")


def test_zero_per_item_mb() -> None:
    raw = minimal()
    raw["services"][1]["per_item_mb"] = 0
    assert error_for(raw).field == "services[1].per_item_mb"


def test_missing_per_item_mb() -> None:
    raw = minimal()
    del raw["services"][0]["per_item_mb"]
    err = error_for(raw)
    assert err.field == "services[0].per_item_mb"
    assert "required" in str(err)


def test_non_numeric_per_item_mb() -> None:
    raw = minimal()
    raw["services"][0]["per_item_mb"] = "lots"
    err = error_for(raw)
    assert err.field == "services[0].per_item_mb"
    assert "must be a number" in str(err)
    raw["services"][0]["per_item_mb"] = True
    assert error_for(raw).field == "services[0].per_item_mb"


def test_service_on_unknown_gpu_lists_valid_indexes() -> None:
    raw = minimal()
    raw["services"][1]["gpu"] = 5
    err = error_for(raw)
    assert err.field == "services[1].gpu"
    assert "[0, 1]" in str(err)
    assert "5" in str(err)


def test_background_and_thermal_on_unknown_gpu() -> None:
    raw = minimal()
    raw["background"] = [{"gpu": 7, "mb": 10}]
    assert error_for(raw).field == "background[0].gpu"
    raw = minimal()
    raw["thermal"] = [{"gpu": 0, "celsius": 5}, {"gpu": 9, "celsius": 5}]
    assert error_for(raw).field == "thermal[1].gpu"


def test_empty_gpus() -> None:
    raw = minimal()
    raw["gpus"] = []
    err = error_for(raw)
    assert err.field == "gpus"
    assert "at least one GPU" in str(err)
    del raw["gpus"]
    assert error_for(raw).field == "gpus"


def test_duplicate_gpu_indexes() -> None:
    raw = minimal()
    raw["gpus"] = [{"index": 2, "total_mb": 1000}, {"index": 2, "total_mb": 2000}]
    err = error_for(raw)
    assert err.field == "gpus"
    assert "unique" in str(err)


def test_unknown_service_field() -> None:
    raw = minimal()
    raw["services"][0]["colour"] = "red"
    err = error_for(raw)
    assert err.field == "services[0].colour"
    assert "per_item_mb" in str(err)  # lists what is allowed


def test_unknown_fields_elsewhere() -> None:
    raw = minimal()
    raw["gpus"][1]["colour"] = "red"
    assert error_for(raw).field == "gpus[1].colour"
    raw = minimal()
    raw["background"] = [{"mb": 1, "colour": "red"}]
    assert error_for(raw).field == "background[0].colour"
    raw = minimal()
    raw["colour"] = "red"
    assert error_for(raw).field == "scenario.colour"


def test_zero_duration() -> None:
    raw = minimal()
    raw["duration_s"] = 0
    err = error_for(raw)
    assert err.field == "duration_s"
    assert "(0, " in str(err)
    del raw["duration_s"]
    assert error_for(raw).field == "duration_s"


def test_step_out_of_range() -> None:
    raw = minimal()
    raw["step_s"] = 0
    assert error_for(raw).field == "step_s"
    raw["step_s"] = 61
    assert error_for(raw).field == "step_s"


@pytest.mark.parametrize("seed", ["7", 1.5, True, None])
def test_seed_not_int(seed: Any) -> None:
    raw = minimal()
    raw["seed"] = seed
    err = error_for(raw)
    assert err.field == "seed"
    assert "integer" in str(err)


def test_name_missing() -> None:
    raw = minimal()
    del raw["name"]
    err = error_for(raw)
    assert err.field == "name"
    raw["name"] = ""
    assert error_for(raw).field == "name"
    raw["name"] = 5
    assert error_for(raw).field == "name"


def test_service_name_missing() -> None:
    raw = minimal()
    del raw["services"][1]["name"]
    assert error_for(raw).field == "services[1].name"


def test_duplicate_service_on_same_gpu() -> None:
    raw = minimal()
    raw["services"][1]["gpu"] = 0
    raw["services"][1]["name"] = "a"
    assert error_for(raw).field == "services"
    # The same name on different GPUs is allowed.
    raw["services"][1]["gpu"] = 1
    assert len(parse_scenario(raw).services) == 2


def test_noise_out_of_range() -> None:
    raw = minimal()
    raw["services"][0]["noise"] = 0.6
    err = error_for(raw)
    assert err.field == "services[0].noise"
    assert "[0, 0.5]" in str(err)


def test_non_mapping_inputs() -> None:
    assert error_for([1, 2]).field == "scenario"
    assert error_for(None).field == "scenario"
    raw = minimal()
    raw["services"] = {"name": "a"}
    assert error_for(raw).field == "services"
    raw = minimal()
    raw["gpus"] = ["GPU0"]
    assert error_for(raw).field == "gpus"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(missing)
    assert info.value.field == "scenario"
    assert "cannot read" in str(info.value)
    assert str(missing) in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, "name: [x\ngpus: 1\n"))
    assert info.value.field == "scenario"
    assert "not valid YAML" in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, ""))
    assert info.value.field == "scenario"


def test_non_utf8_file_raises_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00name: x\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.field == "scenario"


def test_fractional_gpu_index_is_rejected() -> None:
    raw = minimal()
    raw["gpus"][1]["index"] = 1.5
    assert error_for(raw).field == "gpus[1].index"


def test_boolean_gpu_reference_is_rejected() -> None:
    raw = minimal()
    raw["services"][0]["gpu"] = True
    assert error_for(raw).field == "services[0].gpu"


# --------------------------------------------------------------------------- profiles


def test_profiles_one_per_service_with_declared_memory(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, FULL_YAML))
    assert sc.profiles() == (
        ServiceProfile(name="llava", per_item_mb=2800, weight=2),
        ServiceProfile(name="qwen", per_item_mb=1500, weight=1.0),
    )
    for p in sc.profiles():
        assert (p.min_batch_size, p.max_batch_size, p.default_batch_size) == (None, None, None)


def test_profiles_of_minimal_scenario() -> None:
    sc = parse_scenario(minimal())
    assert [p.name for p in sc.profiles()] == ["a", "b"]
    assert all(p.per_item_mb == 100 for p in sc.profiles())


# --------------------------------------------------------------------------- shipped files


def shipped_scenarios() -> list[Path]:
    return sorted((REPO_ROOT / "optimizer" / "scenarios").glob("*.yaml")) + sorted(
        (REPO_ROOT / "examples" / "scenarios").glob("*.yaml")
    )


def test_shipped_scenarios_exist() -> None:
    assert list((REPO_ROOT / "optimizer" / "scenarios").glob("*.yaml")), "no scenario in optimizer/scenarios"
    assert DEFAULT_SCENARIO.is_file()
    assert DEFAULT_SCENARIO in shipped_scenarios()


@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_scenario_parses(path: Path) -> None:
    sc = load_scenario(path)
    assert isinstance(sc, Scenario)
    assert sc.name
    assert sc.gpus
    assert sc.duration_s > 0
    gpu_indexes = {g.index for g in sc.gpus}
    for svc in sc.services:
        assert svc.gpu in gpu_indexes
    assert len(sc.profiles()) == len(sc.services)


def test_default_scenario_contents() -> None:
    sc = load_scenario(DEFAULT_SCENARIO)
    assert sc.name == "default-h100"
    assert [s.name for s in sc.services] == ["vlm"]
    assert sc.gpu(0).total_mb == 81559


# --------------------------------------------------------------------------- the world's costs and drift


def test_costs_drift_and_bursts_parse() -> None:
    raw = minimal()
    raw.update(oom_mode="crash", oom_recovery_s=2, restart_s=45, cleanup_stall_s=0.5)
    raw["gpus"][0].update(slowdown_temperature_c=87, min_clock_fraction=0.4)
    raw["services"][0].update(max_batch_size=64, leak_mb_per_min=5,
                              per_item_changes=[{"at_s": 600, "per_item_mb": 150}])
    raw["background"] = [{"gpu": 0, "at_s": 60, "mb": 4000, "for_s": 20, "every_s": 90}]
    sc = parse_scenario(raw)
    assert (sc.oom_mode, sc.oom_recovery_s, sc.restart_s, sc.cleanup_stall_s) == ("crash", 2, 45, 0.5)
    assert (sc.gpus[0].slowdown_temperature_c, sc.gpus[0].min_clock_fraction) == (87, 0.4)
    a = sc.services[0]
    assert (a.max_batch_size, a.leak_mb_per_min, a.per_item_changes) == (64, 5, ((600.0, 150.0),))
    assert sc.profiles()[0].max_batch_size == 64
    assert sc.background[0].every_s == 90


def test_defaults_of_the_costs() -> None:
    sc = parse_scenario(minimal())
    assert (sc.oom_mode, sc.oom_recovery_s, sc.restart_s, sc.cleanup_stall_s) == ("recover", 3.0, 60.0, 1.0)
    assert (sc.gpus[0].slowdown_temperature_c, sc.gpus[0].min_clock_fraction) == (90.0, 0.5)


@pytest.mark.parametrize(("change", "field"), [
    (lambda r: r.update(oom_mode="explode"), "oom_mode"),
    (lambda r: r.update(restart_s=-1), "restart_s"),
    (lambda r: r["services"][0].update(max_batch_size=0), "services[0].max_batch_size"),
    (lambda r: r["services"][0].update(per_item_changes=[{"at_s": 5, "per_item_mb": 0}]),
     "services[0].per_item_changes[0].per_item_mb"),
    (lambda r: r["services"][0].update(per_item_changes=[{"at_s": 5, "mb": 3}]), "services[0].per_item_changes[0].mb"),
    (lambda r: r["services"][0].update(per_item_changes=[{"at_s": 9, "per_item_mb": 3},
                                                         {"at_s": 5, "per_item_mb": 3}]),
     "services[0].per_item_changes"),
    (lambda r: r.update(background=[{"gpu": 0, "mb": 1, "every_s": 10}]), "background[0].every_s"),
    (lambda r: r.update(background=[{"gpu": 0, "mb": 1, "for_s": 10, "every_s": 10}]), "background[0].every_s"),
    (lambda r: r["gpus"][0].update(min_clock_fraction=0), "gpus[0].min_clock_fraction"),
])
def test_bad_cost_and_drift_fields_are_named(change: Any, field: str) -> None:
    raw = minimal()
    change(raw)
    err = error_for(raw)
    assert err.field == field, str(err)


@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_a_scenario_written_out_reads_back_equal(path: Path) -> None:
    sc = load_scenario(path)
    assert parse_scenario(scenario_to_dict(sc)) == sc


def test_a_scenario_with_every_field_reads_back_equal() -> None:
    raw = minimal()
    raw.update(oom_mode="crash", cleanup_stall_s=0.5)
    raw["services"][0].update(max_batch_size=64, leak_mb_per_min=5, noise=0.1,
                              per_item_changes=[{"at_s": 600, "per_item_mb": 150}])
    raw["background"] = [{"gpu": 1, "at_s": 60, "mb": 4000, "for_s": 20, "every_s": 90, "ramp_s": 3}]
    raw["thermal"] = [{"gpu": 0, "at_s": 6, "celsius": 20}]
    sc = parse_scenario(raw)
    assert parse_scenario(scenario_to_dict(sc)) == sc
