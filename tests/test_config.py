"""Tests for the settings layer (``optimizer/config.py``).

Every test passes ``environ=`` explicitly so nothing depends on the real process environment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from optimizer.config import (
    BackendName,
    Config,
    ConfigError,
    ServerSettings,
    ServiceProfile,
    Settings,
    Strategy,
    apply_server,
    apply_settings,
    env_overrides,
    load_config,
    load_file,
    settings_to_dict,
    validate_settings,
)

# The seed's MemoryConfig, key for key.
SEED_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "strategy": Strategy.BALANCED,
    "monitoring_interval": 5,
    "memory_threshold_warning": 0.8,
    "memory_threshold_critical": 0.9,
    "memory_threshold_oom": 0.95,
    "temperature_threshold": 80,
    "optimization_interval": 60,
    "cleanup_interval": 300,
    "max_batch_size": 16,
    "min_batch_size": 1,
    "memory_reserve_mb": 1024,
    "gc_threshold": 0.85,
    "fragmentation_threshold": 0.3,
}

FULL_YAML = """\
# seed keys at the top level
enabled: true
strategy: aggressive
monitoring_interval: 0.5
memory_threshold_warning: 0.7
memory_threshold_critical: 0.85
memory_threshold_oom: 0.93
temperature_threshold: 85
optimization_interval: 30
cleanup_interval: 600
max_batch_size: 32
min_batch_size: 2
memory_reserve_mb: 2048
gc_threshold: 0.8
fragmentation_threshold: 0.25
target_memory_utilization: 0.7
default_batch_size: 8
profiles:
  - name: llava
    per_item_mb: 3200
    min_batch_size: 2
    max_batch_size: 12
    default_batch_size: 6
    weight: 2.0
  - name: qwen-vl
    per_item_mb: 1500.5
default_profile:
  per_item_mb: 700
  max_batch_size: 10
server:
  host: 127.0.0.1
  port: 9090
  backend: simulated
  scenario: scenarios/two-gpus.yaml
  log_format: json
  log_level: debug
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def raises_config_error(updates: dict[str, Any], base: Settings | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        apply_settings(base or Settings(), updates)
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_equal_seed_memory_config() -> None:
    s = Settings()
    for key, expected in SEED_DEFAULTS.items():
        assert getattr(s, key) == expected, key
    assert s.strategy is Strategy.BALANCED
    assert isinstance(s.max_batch_size, int) and isinstance(s.min_batch_size, int)
    assert isinstance(s.memory_reserve_mb, int)


def test_defaults_are_self_consistent() -> None:
    assert validate_settings(Settings()) == Settings()


def test_load_config_without_file_or_environment_gives_defaults() -> None:
    cfg = load_config(None, environ={})
    assert cfg == Config()
    assert cfg.settings == Settings()
    assert cfg.server == ServerSettings()
    assert cfg.server.port == 8080
    assert cfg.server.backend is BackendName.AUTO


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_batch_size = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- file loading


def test_full_yaml_file_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_YAML), environ={})
    s = cfg.settings
    assert s.enabled is True
    assert s.strategy is Strategy.AGGRESSIVE
    assert s.monitoring_interval == 0.5
    assert (s.memory_threshold_warning, s.memory_threshold_critical, s.memory_threshold_oom) == (0.7, 0.85, 0.93)
    assert s.temperature_threshold == 85.0
    assert s.optimization_interval == 30.0
    assert s.cleanup_interval == 600.0
    assert (s.min_batch_size, s.max_batch_size, s.default_batch_size) == (2, 32, 8)
    assert s.memory_reserve_mb == 2048
    assert s.gc_threshold == 0.8
    assert s.fragmentation_threshold == 0.25
    assert s.target_memory_utilization == 0.7
    assert s.profiles == (
        ServiceProfile(name="llava", per_item_mb=3200.0, min_batch_size=2, max_batch_size=12,
                       default_batch_size=6, weight=2.0),
        ServiceProfile(name="qwen-vl", per_item_mb=1500.5),
    )
    assert s.default_profile == ServiceProfile(name="default", per_item_mb=700.0, max_batch_size=10)

    srv = cfg.server
    assert srv == ServerSettings(host="127.0.0.1", port=9090, backend=BackendName.SIMULATED,
                                 scenario="scenarios/two-gpus.yaml", log_format="json", log_level="debug")


def test_file_values_are_coerced_to_declared_types(tmp_path: Path) -> None:
    path = write(tmp_path, "monitoring_interval: 2\nmax_batch_size: 8.0\nstrategy: ' Adaptive '\nenabled: 'off'\n")
    s = load_config(path, environ={}).settings
    assert isinstance(s.monitoring_interval, float) and s.monitoring_interval == 2.0
    assert isinstance(s.max_batch_size, int) and s.max_batch_size == 8
    assert s.strategy is Strategy.ADAPTIVE
    assert s.enabled is False


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "strategy: conservative\n"), environ={})
    assert cfg.settings == dataclasses.replace(Settings(), strategy=Strategy.CONSERVATIVE)
    assert cfg.server == ServerSettings()


def test_empty_file_and_empty_server_section_give_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "", "empty.yaml"), environ={}) == Config()
    assert load_config(write(tmp_path, "server:\n", "server.yaml"), environ={}) == Config()


def test_load_file_splits_policy_and_server_sections(tmp_path: Path) -> None:
    settings, server = load_file(write(tmp_path, "strategy: aggressive\nserver:\n  port: 1234\n"))
    assert settings == {"strategy": "aggressive"}
    assert server == {"port": 1234}


# --------------------------------------------------------------------------- precedence


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "strategy: aggressive\nmonitoring_interval: 0.5\nserver:\n  port: 9090\n")
    env = {
        "VLM_OPTIMIZER_STRATEGY": "conservative",
        "VLM_OPTIMIZER_MONITORING_INTERVAL": "2.5",
        "VLM_OPTIMIZER_PORT": "7000",
    }
    cfg = load_config(path, environ=env)
    assert cfg.settings.strategy is Strategy.CONSERVATIVE
    assert cfg.settings.monitoring_interval == 2.5
    assert cfg.server.port == 7000


def test_file_value_survives_when_environment_is_silent(tmp_path: Path) -> None:
    path = write(tmp_path, "strategy: aggressive\nmonitoring_interval: 0.5\n")
    cfg = load_config(path, environ={"VLM_OPTIMIZER_STRATEGY": "adaptive", "UNRELATED": "x"})
    assert cfg.settings.strategy is Strategy.ADAPTIVE
    assert cfg.settings.monitoring_interval == 0.5


def test_cli_overrides_environment_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "strategy: aggressive\nmonitoring_interval: 0.5\nserver:\n  port: 9090\n  host: a\n")
    env = {"VLM_OPTIMIZER_STRATEGY": "conservative", "VLM_OPTIMIZER_PORT": "7000", "VLM_OPTIMIZER_HOST": "b"}
    cfg = load_config(
        path,
        environ=env,
        cli_settings={"strategy": "balanced"},
        cli_server={"port": 6000},
    )
    assert cfg.settings.strategy is Strategy.BALANCED  # CLI beats env beats file
    assert cfg.settings.monitoring_interval == 0.5  # only the file set it
    assert cfg.server.port == 6000  # CLI
    assert cfg.server.host == "b"  # env beats file, CLI silent


def test_cli_overrides_defaults_without_file() -> None:
    cfg = load_config(None, environ={}, cli_settings={"max_batch_size": 64}, cli_server={"backend": "none"})
    assert cfg.settings.max_batch_size == 64
    assert cfg.server.backend is BackendName.NONE


def test_env_overrides_reads_every_scalar_key_but_not_profiles() -> None:
    env = {
        "VLM_OPTIMIZER_ENABLED": "false",
        "VLM_OPTIMIZER_MEMORY_RESERVE_MB": "512",
        "VLM_OPTIMIZER_BACKEND": "simulated",
        "VLM_OPTIMIZER_LOG_LEVEL": "warning",
        "VLM_OPTIMIZER_PROFILES": "ignored",
        "VLM_OPTIMIZER_DEFAULT_PROFILE": "ignored",
        "vlm_optimizer_strategy": "aggressive",  # prefix is case-sensitive
    }
    settings, server = env_overrides(env)
    assert settings == {"enabled": "false", "memory_reserve_mb": "512"}
    assert server == {"backend": "simulated", "log_level": "warning"}
    cfg = load_config(None, environ=env)
    assert cfg.settings.enabled is False
    assert cfg.settings.memory_reserve_mb == 512
    assert cfg.settings.strategy is Strategy.BALANCED
    assert cfg.server.backend is BackendName.SIMULATED
    assert cfg.server.log_level == "warning"


def test_invalid_environment_value_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"VLM_OPTIMIZER_MONITORING_INTERVAL": "soon"})
    assert info.value.key == "monitoring_interval"
    assert "must be a number" in str(info.value)
    with pytest.raises(ConfigError) as sinfo:
        load_config(None, environ={"VLM_OPTIMIZER_PORT": "http"})
    assert sinfo.value.key == "server.port"


def test_relations_are_checked_on_the_merged_layers() -> None:
    cfg = load_config(
        None,
        environ={"VLM_OPTIMIZER_MONITORING_INTERVAL": "120"},
        cli_settings={"optimization_interval": 600},
    )
    assert cfg.settings.monitoring_interval == 120.0
    assert cfg.settings.optimization_interval == 600.0


# --------------------------------------------------------------------------- bad values


def test_unknown_strategy_lists_allowed_values() -> None:
    err = raises_config_error({"strategy": "turbo"})
    assert err.key == "strategy"
    msg = str(err)
    for allowed in ("conservative", "balanced", "aggressive", "adaptive"):
        assert allowed in msg
    assert "turbo" in msg


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("memory_threshold_warning", 1.5, "(0, 1]"),
        ("memory_threshold_critical", 0, "(0, 1]"),
        ("gc_threshold", -0.1, "(0, 1]"),
        ("fragmentation_threshold", 1.01, "[0, 1]"),
        ("monitoring_interval", -1, "(0, 86400]"),
        ("monitoring_interval", 0, "(0, 86400]"),
        ("cleanup_interval", float("inf"), "(0, 86400]"),
        ("temperature_threshold", 200, "(0, 150]"),
        ("max_batch_size", 0, "[1, 4096]"),
        ("min_batch_size", 5000, "[1, 4096]"),
        ("memory_reserve_mb", -1, "[0, 16777216]"),
        ("history_size", 0, "[1, 100000]"),
    ],
)
def test_out_of_range_values_name_key_and_range(key: str, value: Any, fragment: str) -> None:
    err = raises_config_error({key: value})
    assert err.key == key
    assert fragment in str(err)
    assert str(err).startswith(f"{key}: ")


def test_nan_is_rejected() -> None:
    err = raises_config_error({"memory_threshold_warning": float("nan")})
    assert err.key == "memory_threshold_warning"


def test_min_batch_size_above_max_batch_size() -> None:
    err = raises_config_error({"min_batch_size": 20, "max_batch_size": 10, "default_batch_size": 10})
    assert err.key == "min_batch_size"
    assert "max_batch_size (10)" in str(err)


def test_default_batch_size_outside_limits() -> None:
    err = raises_config_error({"default_batch_size": 17})
    assert err.key == "default_batch_size"
    assert "[1, 16]" in str(err)


@pytest.mark.parametrize(
    "updates",
    [
        {"memory_threshold_warning": 0.9},  # == critical
        {"memory_threshold_warning": 0.92},  # > critical
        {"memory_threshold_critical": 0.95},  # == oom
        {"memory_threshold_oom": 0.85, "memory_threshold_critical": 0.9},  # oom < critical
    ],
)
def test_threshold_ordering(updates: dict[str, Any]) -> None:
    err = raises_config_error(updates)
    assert err.key == "memory_threshold_critical"
    assert "memory_threshold_warning < memory_threshold_critical < memory_threshold_oom" in str(err)


def test_target_utilization_must_be_below_critical() -> None:
    err = raises_config_error({"target_memory_utilization": 0.9})
    assert err.key == "target_memory_utilization"
    assert "below memory_threshold_critical (0.9)" in str(err)
    # Just below is fine.
    assert apply_settings(Settings(), {"target_memory_utilization": 0.89}).target_memory_utilization == 0.89


def test_optimization_interval_not_below_monitoring_interval() -> None:
    err = raises_config_error({"optimization_interval": 1})
    assert err.key == "optimization_interval"
    assert "monitoring_interval (5 s)" in str(err)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "strategy: balanced\nmax_batch: 4\n"), environ={})
    assert info.value.key == "max_batch"
    assert "unknown key" in str(info.value)
    assert "max_batch_size" in str(info.value)  # lists the allowed keys


def test_unknown_profile_key() -> None:
    err = raises_config_error({"profiles": [{"name": "a", "colour": "red"}]})
    assert err.key == "profiles[0].colour"
    assert "per_item_mb" in str(err)
    err2 = raises_config_error({"profiles": [{"name": "a"}, {"name": "b", "colour": "red"}]})
    assert err2.key == "profiles[1].colour"
    err3 = raises_config_error({"default_profile": {"colour": "red"}})
    assert err3.key == "default_profile.colour"


def test_duplicate_profile_names() -> None:
    err = raises_config_error({"profiles": [{"name": "a"}, {"name": "b"}, {"name": "a"}]})
    assert err.key == "profiles"
    assert "'a'" in str(err)
    assert "unique" in str(err)


@pytest.mark.parametrize(
    ("profile", "key", "fragment"),
    [
        ({"name": "a", "per_item_mb": 0}, "profiles[0].per_item_mb", "(0, 1e+07]"),
        ({"name": "a", "per_item_mb": -5}, "profiles[0].per_item_mb", "(0, 1e+07]"),
        ({"name": "a", "weight": 0}, "profiles[0].weight", "(0, 1e+06]"),
        ({"name": "a", "max_batch_size": "abc"}, "profiles[0].max_batch_size", "must be an integer"),
        ({"name": "a", "min_batch_size": 9, "max_batch_size": 3}, "profiles[0].min_batch_size", "<= max_batch_size"),
        ({"name": ""}, "profiles[0].name", "non-empty string"),
        ({"name": 5}, "profiles[0].name", "non-empty string"),
    ],
)
def test_bad_profile_values(profile: dict[str, Any], key: str, fragment: str) -> None:
    err = raises_config_error({"profiles": [profile]})
    assert err.key == key
    assert fragment in str(err)


def test_profile_without_name_is_rejected() -> None:
    err = raises_config_error({"profiles": [{"per_item_mb": 10}]})
    assert err.key == "profiles[0].name"


def test_profiles_must_be_a_list_of_mappings() -> None:
    assert raises_config_error({"profiles": {"name": "a"}}).key == "profiles"
    assert raises_config_error({"profiles": ["a"]}).key == "profiles[0]"


def test_non_integer_batch_size() -> None:
    err = raises_config_error({"max_batch_size": "abc"})
    assert err.key == "max_batch_size"
    assert "must be an integer" in str(err)
    assert raises_config_error({"max_batch_size": 4.5}).key == "max_batch_size"


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("monitoring_interval", "must be a number"),
        ("memory_threshold_warning", "must be a number"),
        ("max_batch_size", "must be an integer"),
        ("memory_reserve_mb", "must be an integer"),
    ],
)
def test_bool_where_number_expected(key: str, fragment: str) -> None:
    err = raises_config_error({key: True})
    assert err.key == key
    assert fragment in str(err)


def test_non_bool_for_enabled() -> None:
    err = raises_config_error({"enabled": "maybe"})
    assert err.key == "enabled"
    assert "true or false" in str(err)


@pytest.mark.parametrize(
    ("updates", "key", "fragment"),
    [
        ({"port": 70000}, "server.port", "[0, 65535]"),
        ({"port": -1}, "server.port", "[0, 65535]"),
        ({"backend": "cuda"}, "server.backend", "auto, nvml, simulated, none"),
        ({"log_format": "xml"}, "server.log_format", "auto, json, console"),
        ({"log_level": "trace"}, "server.log_level", "debug, info, warning, error"),
        ({"host": ""}, "server.host", "non-empty"),
        ({"scenario": 5}, "server.scenario", "file path"),
        ({"tls": True}, "server.tls", "unknown key"),
    ],
)
def test_bad_server_values(updates: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_server(ServerSettings(), updates)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_bad_server_value_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "server:\n  port: 70000\n"), environ={})
    assert info.value.key == "server.port"
    with pytest.raises(ConfigError) as binfo:
        load_config(write(tmp_path, "server:\n  backend: cuda\n", "b.yaml"), environ={})
    assert binfo.value.key == "server.backend"
    assert "simulated" in str(binfo.value)


def test_server_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "server: 8080\n"), environ={})
    assert info.value.key == "server"


def test_empty_list_server_section_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "server: []\n"), environ={})
    assert info.value.key == "server"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, environ={})
    assert info.value.key == "config"
    assert "cannot read" in str(info.value)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError) as dinfo:
        load_config(tmp_path, environ={})  # a directory
    assert dinfo.value.key == "config"


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "strategy: [balanced\nmonitoring_interval: 1\n"), environ={})
    assert info.value.key == "config"
    assert "not valid YAML" in str(info.value)


def test_top_level_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "- strategy: balanced\n"), environ={})
    assert info.value.key == "config"
    assert "mapping" in str(info.value)


def test_non_utf8_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00strategy: balanced\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "config"


def test_seed_batch_limits_load_without_default_batch_size(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "max_batch_size: 2\n"), environ={})
    assert cfg.settings.max_batch_size == 2
    assert cfg.settings.default_batch_size is None
    assert cfg.settings.default_batch(cfg.settings.default_profile) == 2


# --------------------------------------------------------------------------- all-or-nothing


def test_apply_settings_is_all_or_nothing() -> None:
    base = apply_settings(Settings(), {"strategy": "aggressive", "max_batch_size": 32})
    snapshot = dataclasses.replace(base)
    updates: dict[str, Any] = {
        "strategy": "conservative",
        "monitoring_interval": 1.0,
        "max_batch_size": "lots",  # invalid
        "memory_reserve_mb": 0,
    }
    with pytest.raises(ConfigError) as info:
        apply_settings(base, updates)
    assert info.value.key == "max_batch_size"
    assert base == snapshot
    assert base.strategy is Strategy.AGGRESSIVE
    assert base.monitoring_interval == 5.0
    assert base.max_batch_size == 32
    assert base.memory_reserve_mb == 1024


def test_apply_settings_is_all_or_nothing_for_relation_errors() -> None:
    base = Settings()
    with pytest.raises(ConfigError) as info:
        apply_settings(base, {"strategy": "aggressive", "memory_threshold_warning": 0.95})
    assert info.value.key == "memory_threshold_critical"
    assert base == Settings()
    assert base.strategy is Strategy.BALANCED


def test_apply_settings_returns_new_object() -> None:
    base = Settings()
    new = apply_settings(base, {"strategy": "adaptive", "max_batch_size": "24"})
    assert new is not base
    assert new.strategy is Strategy.ADAPTIVE
    assert new.max_batch_size == 24
    assert base == Settings()
    assert apply_settings(base, {}) == base


def test_failed_load_config_applies_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "strategy: aggressive\nmemory_threshold_warning: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "memory_threshold_warning"
    assert Settings().strategy is Strategy.BALANCED


# --------------------------------------------------------------------------- profiles


def test_profile_lookup_and_default_renamed() -> None:
    s = apply_settings(
        Settings(),
        {
            "profiles": [{"name": "llava", "per_item_mb": 3200, "weight": 2}],
            "default_profile": {"per_item_mb": 256, "max_batch_size": 8},
        },
    )
    llava = s.profile("llava")
    assert llava == ServiceProfile(name="llava", per_item_mb=3200.0, weight=2.0)
    other = s.profile("other")
    assert other == ServiceProfile(name="other", per_item_mb=256.0, max_batch_size=8)
    assert s.default_profile.name == "default"  # the stored default keeps its name


def test_profile_of_unknown_service_with_builtin_default() -> None:
    assert Settings().profile("svc") == ServiceProfile(name="svc")
    assert Settings().profile("svc").per_item_mb == 512.0


def test_batch_limits_fall_back_to_global() -> None:
    s = Settings()
    assert s.batch_limits(ServiceProfile(name="a")) == (1, 16)
    assert s.default_batch(ServiceProfile(name="a")) == 4


def test_batch_limits_respect_profile_overrides() -> None:
    s = Settings()
    assert s.batch_limits(ServiceProfile(name="a", min_batch_size=2, max_batch_size=12)) == (2, 12)
    assert s.batch_limits(ServiceProfile(name="a", max_batch_size=64)) == (1, 64)
    assert s.batch_limits(ServiceProfile(name="a", min_batch_size=3)) == (3, 16)


def test_batch_limits_clamp_max_to_min() -> None:
    s = Settings()
    # A profile minimum above the global maximum: the upper limit is raised to the minimum.
    assert s.batch_limits(ServiceProfile(name="a", min_batch_size=32)) == (32, 32)
    # A profile maximum below the global minimum.
    s8 = apply_settings(Settings(), {"min_batch_size": 8, "default_batch_size": 8})
    assert s8.batch_limits(ServiceProfile(name="a", max_batch_size=4)) == (8, 8)


def test_default_batch_respects_profile_and_clamps() -> None:
    s = Settings()
    assert s.default_batch(ServiceProfile(name="a", default_batch_size=6)) == 6
    assert s.default_batch(ServiceProfile(name="a", default_batch_size=40)) == 16  # clamped to global max
    assert s.default_batch(ServiceProfile(name="a", max_batch_size=2)) == 2  # global default 4 clamped
    assert s.default_batch(ServiceProfile(name="a", min_batch_size=10)) == 10
    assert s.default_batch(ServiceProfile(name="a", min_batch_size=2, max_batch_size=8, default_batch_size=1)) == 2


def test_profile_batch_values_from_file(tmp_path: Path) -> None:
    s = load_config(write(tmp_path, FULL_YAML), environ={}).settings
    llava = s.profile("llava")
    assert s.batch_limits(llava) == (2, 12)
    assert s.default_batch(llava) == 6
    qwen = s.profile("qwen-vl")
    assert s.batch_limits(qwen) == (2, 32)
    assert s.default_batch(qwen) == 8
    unknown = s.profile("unknown")
    assert unknown.per_item_mb == 700.0
    assert s.batch_limits(unknown) == (2, 10)
    assert s.default_batch(unknown) == 8


# --------------------------------------------------------------------------- round trip


def test_settings_to_dict_uses_plain_values() -> None:
    d = settings_to_dict(Settings())
    assert d["strategy"] == "balanced"
    assert type(d["strategy"]) is str
    assert d["profiles"] == []
    assert d["default_profile"] == {
        "name": "default",
        "per_item_mb": 512.0,
        "min_batch_size": None,
        "max_batch_size": None,
        "default_batch_size": None,
        "weight": 1.0,
    }
    for key, expected in SEED_DEFAULTS.items():
        assert d[key] == expected, key


def test_settings_to_dict_round_trips_defaults() -> None:
    assert apply_settings(Settings(), settings_to_dict(Settings())) == Settings()


def test_settings_to_dict_round_trips_loaded_file(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, FULL_YAML), environ={}).settings
    d = settings_to_dict(loaded)
    assert d["strategy"] == "aggressive"
    assert [p["name"] for p in d["profiles"]] == ["llava", "qwen-vl"]
    assert apply_settings(Settings(), d) == loaded


def test_settings_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    import yaml

    loaded = load_config(write(tmp_path, FULL_YAML), environ={}).settings
    dumped = write(tmp_path, yaml.safe_dump(settings_to_dict(loaded)), "dumped.yaml")
    assert load_config(dumped, environ={}).settings == loaded


# --------------------------------------------------------------------------- the kubernetes: section


def test_kubernetes_section_layers_file_environment_and_flags(tmp_path: Path) -> None:
    from optimizer.config.kube import KubeSettings

    f = tmp_path / "c.yaml"
    f.write_text("kubernetes:\n  discovery: true\n  namespaces: [vlm, batch]\n  publish_interval: 30\n")
    cfg = load_config(f, environ={"NODE_NAME": "gpu-1", "VLM_OPTIMIZER_KUBE_PUBLISH": "true"},
                      cli_kube={"label_selector": "team=vision"})
    assert cfg.kube == KubeSettings(discovery=True, node_name="gpu-1", namespaces=("vlm", "batch"),
                                    publish=True, publish_interval=30.0, label_selector="team=vision")
    env_ns = load_config(f, environ={"NODE_NAME": "gpu-1", "VLM_OPTIMIZER_KUBE_NAMESPACES": "a, b,a"})
    assert env_ns.kube.namespaces == ("a", "b")
    assert load_config(environ={}).kube == KubeSettings()


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ("kubernetes:\n  discovery: maybe\n", "kubernetes.discovery", "true or false"),
    ("kubernetes:\n  namespaces: [Bad_NS]\n", "kubernetes.namespaces", "not a namespace name"),
    ("kubernetes:\n  publish_interval: 0\n", "kubernetes.publish_interval", "[1, 86400]"),
    ("kubernetes:\n  watch: true\n", "kubernetes.watch", "allowed keys are discovery, kubeconfig"),
    ("kubernetes: [1]\n", "kubernetes", "mapping"),
    ("kubernetes:\n  publish: true\n", "kubernetes.publish", "needs kubernetes.discovery"),
])
def test_bad_kubernetes_settings_name_the_key(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={"NODE_NAME": "gpu-1"})
    assert e.value.key == key and allowed in str(e.value)


# --------------------------------------------------------------------------- the read API's trust settings


def test_trust_settings_defaults_file_and_environment(tmp_path: Path) -> None:
    s = Settings()
    assert (s.register_unknown, s.max_services_per_gpu, s.max_services) == (True, 64, 256)
    path = write(tmp_path, "register_unknown: false\nmax_services_per_gpu: 8\n")
    cfg = load_config(path, environ={"VLM_OPTIMIZER_MAX_SERVICES": "32"})
    assert (cfg.settings.register_unknown, cfg.settings.max_services_per_gpu, cfg.settings.max_services) == (
        False, 8, 32)


@pytest.mark.parametrize(("updates", "key", "text"), [
    ({"register_unknown": "maybe"}, "register_unknown", "true or false"),
    ({"max_services": 0}, "max_services", "[1, 100000]"),
    ({"max_services_per_gpu": 2.5}, "max_services_per_gpu", "integer"),
    ({"max_services_per_gpu": 300}, "max_services_per_gpu", "must be <= max_services (256)"),
])
def test_bad_trust_settings_name_the_key_and_change_nothing(updates: dict[str, Any], key: str, text: str) -> None:
    base = Settings()
    with pytest.raises(ConfigError) as info:
        apply_settings(base, updates)
    assert info.value.key == key and text in str(info.value)
    assert base == Settings()


def test_profiles_are_looked_up_by_name_the_first_declared_winning() -> None:
    s = Settings(profiles=(ServiceProfile(name="a", per_item_mb=100.0), ServiceProfile(name="a", per_item_mb=200.0)))
    assert s.profile("a").per_item_mb == 100.0
    assert s.profile("b") == dataclasses.replace(s.default_profile, name="b")
    assert dataclasses.replace(s, profiles=()).profile("a").per_item_mb == 512.0  # a new value, a new lookup
