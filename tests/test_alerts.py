"""The alerting rules in ops/alerts: promtool accepts them and their unit tests pass, every alert
follows the monitoring-mixin conventions and has a case that fires and one that stays silent, the
unit tests catch a changed threshold, the PrometheusRule carries the same groups, and every metric
the rules read is one the optimizer exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.core import Metric

from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.gpu.none import NoGpuBackend
from optimizer.metrics import OptimizerCollector
from optimizer.sampler import Sampler
from tests.tools import require

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "ops" / "alerts"
RULES = ALERTS / "vlm-gpu-memory-optimizer.rules.yaml"
PROMETHEUS_RULE = ALERTS / "prometheusrule.yaml"
RENDER = ALERTS / "render_prometheusrule.py"
TEST_FILES = sorted((ALERTS / "tests").glob("*.yaml"))

GROUP = "vlm-gpu-memory-optimizer"
JOB = "vlm-gpu-memory-optimizer"
SEVERITIES = {"critical", "warning", "info"}
#: The alerts users expect (seed 004).
SEED_ALERTS = (
    "VLMMemoryOptimizerDown",
    "VLMMemoryUsageHigh",
    "VLMMemoryUsageCritical",
    "VLMMemoryOptimizationFailed",
    "VLMMemoryFragmentationHigh",
    "VLMBatchSizeOptimizationActive",
)
CAMEL_WITH_PREFIX = re.compile(r"VLM[A-Z][A-Za-z0-9]*")
METRIC = re.compile(r"\bvlm_[a-z0-9_]+\b")


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def rules_doc() -> dict[str, Any]:
    doc = load_yaml(RULES)
    assert isinstance(doc, dict)
    return doc


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rules_doc()["groups"] for rule in group["rules"] if "alert" in rule]


def alert_names() -> list[str]:
    return [str(rule["alert"]) for rule in alert_rules()]


def rule_tests() -> list[dict[str, Any]]:
    """Every ``alert_rule_test`` entry of every promtool test file."""
    found: list[dict[str, Any]] = []
    for path in TEST_FILES:
        doc = load_yaml(path)
        for test in doc["tests"]:
            found.extend(test.get("alert_rule_test") or [])
    return found


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_rules_file() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [rule for group in rules_doc()["groups"] for rule in group["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_there_are_promtool_test_files() -> None:
    assert TEST_FILES, "ops/alerts/tests/*.yaml: no promtool unit tests"
    for path in TEST_FILES:
        assert load_yaml(path)["rule_files"] == ["../" + RULES.name], path.name


@pytest.mark.parametrize("path", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# Each mutation changes one alert the way a careless edit would; the unit tests must notice.
MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "down-threshold": ("VLMMemoryOptimizerDown", lambda r: r.update(expr=r["expr"].replace("== 0", "== 2"))),
    "absent-job": ("VLMMemoryOptimizerAbsent", lambda r: r.update(expr=r["expr"].replace(JOB, "vlm-optimizer"))),
    "high-threshold": ("VLMMemoryUsageHigh", lambda r: r.update(expr=r["expr"].replace("> 90", "> 95"))),
    "critical-threshold": ("VLMMemoryUsageCritical", lambda r: r.update(expr=r["expr"].replace("> 95", "> 90"))),
    "failed-window": ("VLMMemoryOptimizationFailed", lambda r: r.update(expr=r["expr"].replace("[10m]", "[30m]"))),
    "fragmentation-for": ("VLMMemoryFragmentationHigh", lambda r: r.update({"for": "3m"})),
    "batch-threshold": ("VLMBatchSizeOptimizationActive", lambda r: r.update(expr=r["expr"].replace(">= 4", ">= 3"))),
    "failing-without-unless": ("VLMOptimizerSamplingFailing", lambda r: r.update(expr=r["expr"].split("unless")[0])),
    "gpu-failed-for": ("VLMOptimizerGPUFailed", lambda r: r.update({"for": "5m"})),
    "stale-measured-at-evaluation": ("VLMOptimizerSamplingStale", lambda r: r.update(
        expr=r["expr"].replace("timestamp(vlm_optimizer_last_sample_timestamp_seconds)", "time()"))),
    "paused-for": ("VLMOptimizerMonitoringPaused", lambda r: r.update({"for": "10m"})),
    "paused-on-running": ("VLMOptimizerMonitoringPaused", lambda r: r.update(expr=r["expr"].replace("== 0", "== 1"))),
    "save-window": ("VLMOptimizerStateSaveFailing", lambda r: r.update(expr=r["expr"].replace("[10m]", "[1m]"))),
    "save-threshold": ("VLMOptimizerStateSaveFailing", lambda r: r.update(expr=r["expr"].replace("> 0", "> 10"))),
    "fatal-xid-codes": ("VLMGpuFatalXid", lambda r: r.update(expr=r["expr"].replace("|79", ""))),
    "fatal-xid-any-code": ("VLMGpuFatalXid", lambda r: r.update(expr=r["expr"].replace('{xid=~"48|64|74|79|95"}', ""))),
    "ecc-type": ("VLMGpuUncorrectableEccErrors", lambda r: r.update(expr=r["expr"].replace("uncorrected", "corrected"))),
    "ecc-window": ("VLMGpuUncorrectableEccErrors", lambda r: r.update(expr=r["expr"].replace("[10m]", "[30m]"))),
    "throttling-for": ("VLMGpuThrottling", lambda r: r.update({"for": "5m"})),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_unit_tests_catch_a_changed_rule(mutation: str, tmp_path: Path) -> None:
    alert, change = MUTATIONS[mutation]
    doc = rules_doc()
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    before = dict(rule)
    change(rule)
    assert rule != before, f"{mutation} changed nothing: the rule was edited, update the mutation"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    shutil.copytree(ALERTS / "tests", tmp_path / "tests")
    result = promtool("test", "rules", *sorted(str(p) for p in (tmp_path / "tests").glob("*.yaml")))
    assert result.returncode != 0, f"{mutation}: every promtool test still passes"
    assert f"alertname: {alert}," in result.stdout + result.stderr


# ------------------------------------------------------------------------------------- conventions


def test_one_group_with_unique_alert_names() -> None:
    groups = rules_doc()["groups"]
    assert [g["name"] for g in groups] == [GROUP]
    names = alert_names()
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_the_seed_alerts_exist() -> None:
    assert set(SEED_ALERTS) <= set(alert_names())


@pytest.mark.parametrize("rule", alert_rules(), ids=alert_names())
def test_alert_follows_the_conventions(rule: dict[str, Any]) -> None:
    assert CAMEL_WITH_PREFIX.fullmatch(rule["alert"]), f"{rule['alert']}: not CamelCase with the VLM prefix"
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    for key in ("summary", "description"):
        assert isinstance(annotations.get(key), str) and annotations[key].strip(), f"{rule['alert']}: no {key}"
    assert annotations["runbook_url"].endswith("docs/deploy.md#alerts")


def test_the_scrape_job_is_the_documented_one() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert exprs["VLMMemoryOptimizerDown"] == f'up{{job="{JOB}"}} == 0'
    assert exprs["VLMMemoryOptimizerAbsent"] == f'absent(up{{job="{JOB}"}})'


@pytest.mark.parametrize("name", alert_names())
def test_alert_has_a_firing_and_a_silent_case(name: str) -> None:
    cases = [t for t in rule_tests() if t["alertname"] == name]
    firing = [t for t in cases if t.get("exp_alerts")]
    silent = [t for t in cases if not t.get("exp_alerts")]
    assert firing, f"{name}: no promtool case where it fires"
    assert silent, f"{name}: no promtool case where it stays silent"
    for case in firing:
        for alert in case["exp_alerts"]:
            assert alert["exp_labels"]["severity"] in SEVERITIES
            assert {"summary", "description"} <= set(alert.get("exp_annotations") or {}), \
                f"{name} at {case['eval_time']}: the annotations are not checked"


def test_promtool_cases_name_existing_alerts() -> None:
    # promtool passes a case with `exp_alerts: []` for an alert that does not exist: catch typos.
    unknown = {t["alertname"] for t in rule_tests()} - set(alert_names())
    assert not unknown


# -------------------------------------------------------------------------------- PrometheusRule


def test_prometheusrule_carries_the_same_groups() -> None:
    obj = load_yaml(PROMETHEUS_RULE)
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["kind"] == "PrometheusRule"
    assert obj["metadata"]["namespace"] == "medical-kg"
    assert obj["metadata"]["labels"] == {"app": "vlm-gpu-memory-optimizer", "release": "prometheus"}
    assert obj["spec"]["groups"] == rules_doc()["groups"]


def test_prometheusrule_is_rendered_from_the_rules_file() -> None:
    result = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_kustomize_ships_the_prometheusrule() -> None:
    # ops/k8s/monitoring includes ops/alerts as a kustomize directory
    assert load_yaml(ALERTS / "kustomization.yaml")["resources"] == [PROMETHEUS_RULE.name]


def test_every_alert_is_explained_in_the_readme() -> None:
    explained = (ALERTS / "README.md").read_text(encoding="utf-8").split("## The alerts", 1)[-1]
    assert not [name for name in alert_names() if f"`{name}`" not in explained]


# ----------------------------------------------------------------------------------------- metrics


def exposition_names() -> set[str]:
    """Every sample name the optimizer's collector can expose (counters with ``_total``)."""
    engine = Engine(Settings())
    collector = OptimizerCollector(engine, Sampler(NoGpuBackend(), engine))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    families: list[Metric] = list(collector.collect())
    return {f.name + suffix for f in families for suffix in suffixes[f.type]}


def test_rules_read_only_exported_metrics() -> None:
    exported = exposition_names()
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for rule in alert_rules():
        # the expression and the queries in its annotations
        used = set(METRIC.findall(rule["expr"])) | set(METRIC.findall(" ".join(rule["annotations"].values())))
        assert used <= exported, f"{rule['alert']}: {sorted(used - exported)} not exported"
        for name in used:
            family = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert f"`{name}`" in docs or f"`{family}`" in docs, f"{name} is not in docs/metrics.md"


def test_every_exported_metric_family_is_seen() -> None:
    # guards exposition_names(): a collector change that hid families would make the check above vacuous
    assert {"vlm_memory_usage_percent", "vlm_memory_optimizations_failed_total", "vlm_gpu_up",
            "vlm_optimizer_sample_errors_total", "vlm_optimizer_last_sample_timestamp_seconds",
            "vlm_optimizer_sample_duration_seconds_count", "vlm_optimizer_state_save_errors_total",
            "vlm_optimizer_monitoring_enabled"} <= exposition_names()
