"""The Grafana dashboard (ops/grafana): its shape, and every query against real data.

The static tests read the dashboard JSON: the seed's panels by title, the datasource variable on every
panel and target, metric names that the optimizer exports (docs/metrics.md), the template variables in
every selector, units, and thresholds that match the alert rules; and the kustomization that ships the
dashboard as a ConfigMap for Grafana's sidecar.

The end-to-end tests run ``python -m optimizer serve --backend simulated`` on
``tests/grafana_scenario.yaml`` and a real Prometheus server that scrapes it every second with the static
label ``node="test-node"``. This is the label that the ServiceMonitor's relabelling adds in Kubernetes.
Then every panel's query and every template variable's query, with the variables substituted as Grafana
would, must return data. A selection that excludes everything must return none. A second Prometheus loads
the alert rules (ops/alerts) and must evaluate each of them without error.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimizer.metrics import SEED_METRICS
from tests.tools import require

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops/grafana/vlm-gpu-memory-optimizer-dashboard.json"
RULES = ROOT / "ops/alerts/vlm-gpu-memory-optimizer.rules.yaml"
SCENARIO = ROOT / "tests/grafana_scenario.yaml"
METRICS_DOC = ROOT / "docs/metrics.md"

JOB = "vlm-gpu-memory-optimizer"  # the job name that the alert rules select (up{job=...})
NODE = "test-node"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

SEED_PANELS = (
    "GPU Memory Usage",
    "GPU Memory Details",
    "GPU Utilization",
    "GPU Temperature",
    "Batch Size Optimization",
    "Memory Optimization Actions",
    "Memory Fragmentation",
    "Memory Optimization Success Rate",
    "Memory Freed Over Time",
)
#: The GPU health row (Xid, ECC, clock throttling, retired pages / row remapping).
HEALTH_PANELS = ("GPU Xid Errors", "GPU ECC Errors", "GPU Clock Throttling", "GPU Retired Pages and Row Remapping")
UNITS = {
    "GPU Memory Usage": "percent",
    "GPU Memory Details": "bytes",
    "GPU Utilization": "percent",
    "GPU Temperature": "celsius",
    "GPU Power": "watt",
    "Batch Size Optimization": "none",
    "Memory Optimization Actions": "ops",
    "Memory Fragmentation": "percent",
    "Memory Optimization Success Rate": "percent",
    "Memory Freed Over Time": "binBps",
    **dict.fromkeys(HEALTH_PANELS, "none"),
}
#: The threshold lines of a panel, each equal to an alert threshold or a policy default (docs/configuration.md).
THRESHOLDS = {
    "GPU Memory Usage": [90.0, 95.0],  # VLMMemoryUsageHigh, VLMMemoryUsageCritical
    "Memory Fragmentation": [30.0],  # fragmentation_threshold, VLMMemoryFragmentationHigh
    "GPU Temperature": [80.0],  # temperature_threshold
}
#: Grafana's built-in variables, as Grafana would expand them for a short time range and a 1 s scrape.
BUILTINS = {"$__rate_interval": "10s", "$__interval": "5s", "$__range": "5m"}
ALL = ".*"  # the variables' allValue
VARIABLES = ("node", "gpu", "service")
SELECTOR = re.compile(r"\b(vlm_[a-z_]+)\b(\{[^}]*\})?")


# --------------------------------------------------------------------------- the dashboard, read


@dataclass(frozen=True)
class Target:
    panel: str
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"{self.panel!r} target {self.ref}"


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data, including those inside collapsed rows."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def _targets() -> list[Target]:
    return [Target(p["title"], t["refId"], t["expr"]) for p in _panels(_dashboard()) for t in p["targets"]]


def _variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def _variable_query(var: Mapping[str, Any]) -> str:
    q = var["query"]
    return str(q["query"] if isinstance(q, dict) else q)


@dataclass(frozen=True)
class DocMetric:
    type: str
    labels: frozenset[str]


def _documented_metrics() -> dict[str, DocMetric]:
    """The metrics in docs/metrics.md's tables: name, type and labels."""
    row = re.compile(r"^\|\s*`(vlm_[a-z_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|")
    out = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = row.match(line)
        if m:
            labels = frozenset(x.strip() for x in m.group(3).split(",") if x.strip())
            out[m.group(1)] = DocMetric(m.group(2), labels)
    return out


def render(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` as Grafana would send it, with ``values`` for the template variables."""
    for builtin, expansion in BUILTINS.items():
        expr = expr.replace(builtin, expansion)

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"the query uses ${name}, which is not a template variable here: {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# --------------------------------------------------------------------------- static tests


def test_the_dashboard_is_importable_with_its_uid_title_and_tags() -> None:
    d = _dashboard()
    assert d["uid"] == "vlm-gpu-memory-optimizer"
    assert d["title"] == "VLM GPU Memory Optimization"
    assert d["schemaVersion"] >= 38
    assert d["id"] is None  # an import creates it; a fixed id would overwrite another dashboard
    assert {"vlm", "gpu"} <= set(d["tags"])


def test_it_has_the_seed_panels_and_gpu_power_without_overlap() -> None:
    panels = _panels(_dashboard())
    titles = [p["title"] for p in panels]
    assert sorted(titles) == sorted([*SEED_PANELS, "GPU Power", *HEALTH_PANELS])
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']!r} overlaps another panel"
        cells |= mine


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    variables = _variables()
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in _panels(_dashboard()):
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, f"{p['title']!r} target {t['refId']}"
    for name in VARIABLES:
        assert variables[name]["datasource"] == DATASOURCE, name


def test_the_template_variables_offer_all_and_match_everything_with_it() -> None:
    variables = _variables()
    assert list(variables) == ["datasource", *VARIABLES]
    for name in VARIABLES:
        v = variables[name]
        assert v["type"] == "query", name
        assert v["includeAll"] is True and v["allValue"] == ALL and v["multi"] is True, name
        assert v["current"]["value"] == ["$__all"], name
        assert re.fullmatch(rf"label_values\(vlm_[a-z_]+(\{{[^}}]*\}})?, {name}\)", _variable_query(v)), name


def test_queries_use_only_documented_metrics_and_cover_the_seed_ones() -> None:
    documented = _documented_metrics()
    assert set(SEED_METRICS) <= set(documented)
    used: set[str] = set()
    for t in _targets():
        for name, _ in SELECTOR.findall(t.expr):
            assert name in documented, f"{t}: {name} is not a metric the optimizer exports (docs/metrics.md)"
            if documented[name].type == "counter":
                assert name.endswith("_total"), name
                assert re.search(rf"\b(rate|increase)\(\s*{name}\{{[^}}]*\}}\[", t.expr), \
                    f"{t}: the counter {name} is shown raw, not as a rate or an increase"
            used.add(name)
    for v in map(_variable_query, _variables().values()):
        used |= {name for name, _ in SELECTOR.findall(v)}
    assert set(SEED_METRICS) <= used, f"seed metrics on no panel: {sorted(set(SEED_METRICS) - used)}"


def test_every_selector_filters_on_the_template_variables_of_its_labels() -> None:
    documented = _documented_metrics()
    queries = [(str(t), t.expr) for t in _targets()]
    queries += [(f"variable {n}", _variable_query(v)) for n, v in _variables().items() if n in VARIABLES]
    for where, expr in queries:
        for name, matchers in SELECTOR.findall(expr):
            labels = documented[name].labels | {"node"}
            own = where.removeprefix("variable ")
            wanted = [v for v in VARIABLES if v in labels and v != own]
            if where.startswith("variable"):  # each variable filters on the ones before it
                wanted = [v for v in wanted if VARIABLES.index(v) < VARIABLES.index(own)]
            for var in wanted:
                assert f'{var}=~"${var}"' in matchers, f"{where}: {name} does not filter on ${var}"


def test_units_ranges_and_thresholds() -> None:
    for p in _panels(_dashboard()):
        title, defaults = p["title"], p["fieldConfig"]["defaults"]
        assert defaults["unit"] == UNITS[title], title
        if defaults["unit"] == "percent":
            assert defaults.get("min") == 0, title
            if title != "Memory Fragmentation":  # 0-100, except fragmentation: its axis fits the data
                assert defaults.get("max") == 100, title
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["value"] is None, title
        if title in THRESHOLDS:
            assert [s["value"] for s in steps[1:]] == THRESHOLDS[title], title
            assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off", title


def test_threshold_lines_are_the_alert_rules_thresholds() -> None:
    """Where an alert compares a panel's metric with a constant, the panel draws that constant."""
    if not RULES.exists():
        _missing_rules()
    metric_of = {"GPU Memory Usage": "vlm_memory_usage_percent",
                 "Memory Fragmentation": "vlm_memory_fragmentation_percent",
                 "GPU Temperature": "vlm_gpu_temperature_celsius"}
    exprs = [str(r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    for title, metric in metric_of.items():
        compared = {float(n) for e in exprs
                    for n in re.findall(rf"{metric}(?:\{{[^}}]*\}})?(?:\[[^\]]*\])?\)*\s*>=?\s*([0-9.]+)", e)}
        assert compared <= set(THRESHOLDS[title]), f"{title}: the alerts fire at {sorted(compared)}"
    assert {90.0, 95.0} <= {float(n) for e in exprs for n in re.findall(r"vlm_memory_usage_percent\s*>\s*([0-9.]+)", e)}


def _missing_rules() -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{RULES.relative_to(ROOT)} is missing")
    pytest.skip(f"{RULES.relative_to(ROOT)} does not exist yet")


def test_the_success_rate_is_undefined_without_optimizations_not_a_division_by_zero(tmp_path: Path) -> None:
    """Evaluated by promtool on series of our own: none started gives no value (not NaN, Inf or 0 %)."""
    promtool = require("promtool")
    (expr,) = [t.expr for t in _targets() if t.panel == "Memory Optimization Success Rate"]
    query = render(expr, dict.fromkeys(VARIABLES, ALL))

    def series(metric: str, gpu: str, values: str) -> dict[str, str]:
        return {"series": f'{metric}{{node="n1", gpu="{gpu}", uuid="GPU-{gpu}", trigger="critical"}}',
                "values": values}

    case = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                series("vlm_memory_optimizations_total", "0", "0 0 0 0 0 0"),  # nothing happened
                series("vlm_memory_optimizations_success_total", "0", "0 0 0 0 0 0"),
                series("vlm_memory_optimizations_total", "1", "0 1 2 3 4 4"),  # 4 started, 3 succeeded
                series("vlm_memory_optimizations_success_total", "1", "0 0 1 2 3 3"),
            ],
            "promql_expr_test": [{"expr": query, "eval_time": "5m",
                                  "exp_samples": [{"labels": '{node="n1", gpu="1"}', "value": 75}]}],
        }],
    }
    path = tmp_path / "success_rate_test.yaml"
    path.write_text(yaml.safe_dump(case))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kustomization_ships_the_dashboard_as_a_sidecar_configmap() -> None:
    kubectl = require("kubectl")
    done = subprocess.run([kubectl, "kustomize", str(DASHBOARD.parent)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (cm,) = list(yaml.safe_load_all(done.stdout))
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "vlm-gpu-memory-optimizer-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][DASHBOARD.name]) == _dashboard()


# --------------------------------------------------------------------------- real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else body.decode(errors="replace")


def _poll(what: str, check: Callable[[], bool], timeout: float, on_timeout: Callable[[], str] = lambda: "") -> None:
    """Call ``check`` until it is true, with a short back-off; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s. {on_timeout()}")
        time.sleep(pause)  # back-off between polls; the synchronisation is the condition itself
        pause = min(pause * 2, 0.5)


def _listening(url: str) -> bool:
    try:
        status, _ = _http_json(url)
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError, TimeoutError):
        return False
    return status == 200


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _alive(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    if proc.poll() is not None:
        pytest.fail(f"{name} exited with {proc.returncode}:\n{_tail(log)}")


@pytest.fixture(scope="module")
def optimizer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``serve --backend simulated`` on tests/grafana_scenario.yaml, sampling every 0.5 s."""
    port, admin_port = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("optimizer") / "optimizer.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--scenario", str(SCENARIO),
             "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
             "--monitoring-interval", "0.5", "--optimization-interval", "2", "--log-format", "json"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            _alive(proc, "the optimizer", log)
            return _listening(base + "/ready")

        _poll("the optimizer answers /ready", ready, 30, lambda: _tail(log))
        yield base
    finally:
        _stop(proc)


@contextmanager
def _prometheus(directory: Path, scrape: str, rule_files: list[Path]) -> Iterator[str]:
    """A Prometheus server scraping ``scrape`` every second as job ``vlm-gpu-memory-optimizer``."""
    binary = require("prometheus")
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{
            "job_name": JOB,
            "static_configs": [{"targets": [scrape], "labels": {"node": NODE}}],
        }],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            _alive(proc, "prometheus", log)
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=5) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        _poll("prometheus answers /-/ready", ready, 30, lambda: _tail(log))
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus_url(optimizer_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _prometheus(tmp_path_factory.mktemp("prometheus"), optimizer_url.removeprefix("http://"), []) as url:
        yield url


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    status, body = _http_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200 and body["status"] == "success", f"{expr}: {body}"
    assert body["data"]["resultType"] == "vector", expr
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _label_values(prometheus: str, variable_query: str, values: Mapping[str, str]) -> list[str]:
    """What a ``label_values(selector, label)`` variable query offers (the API Grafana calls for it)."""
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", render(variable_query, values))
    assert m, variable_query
    url = f"{prometheus}/api/v1/label/{m.group(2)}/values?" + urllib.parse.urlencode({"match[]": m.group(1)})
    status, body = _http_json(url)
    assert status == 200 and body["status"] == "success", f"{variable_query}: {body}"
    found: list[str] = body["data"]
    return found


def _all_have_data(prometheus: str, values: Mapping[str, str], timeout: float) -> dict[str, int]:
    """Poll every target, as rendered with ``values``, until each returns series; their number by target."""
    waiting = {str(t): render(t.expr, values) for t in _targets()}
    found: dict[str, int] = {}

    def check() -> bool:
        for name, expr in list(waiting.items()):
            result = _query(prometheus, expr)
            if result:
                found[name] = len(result)
                del waiting[name]
        return not waiting

    _poll("every panel query returns data", check, timeout,
          lambda: "still empty: " + "; ".join(f"{k}: {v}" for k, v in waiting.items()))
    return found


# --------------------------------------------------------------------------- end-to-end tests


def test_every_panel_query_has_data_with_all_selected(prometheus_url: str) -> None:
    found = _all_have_data(prometheus_url, dict.fromkeys(VARIABLES, ALL), timeout=60)
    assert found[str(Target("GPU Memory Usage", "A", ""))] == 2  # both GPUs of the scenario
    assert found[str(Target("Batch Size Optimization", "A", ""))] == 2  # vlm and captioner


def test_the_scenario_exercised_every_kind_of_action(prometheus_url: str) -> None:
    """So that the panels above show more than zeros: cleanups, optimizations and their outcome,
    batch changes and memory freed, all seen by Prometheus."""
    sel = f'{{node="{NODE}", job="{JOB}"}}'
    wanted = [f"sum(vlm_memory_cleanups_total{sel}) > 0",
              f"sum(vlm_memory_optimizations_total{sel}) > 0",
              f"sum(vlm_memory_optimizations_success_total{sel}) > 0",
              f"sum(vlm_batch_size_optimizations_total{sel}) > 1",
              f"sum(vlm_memory_freed_bytes_total{sel}) > 0",
              f"count(vlm_memory_fragmentation_percent{sel}) > 0",
              f'sum(vlm_gpu_xid_errors_total{{node="{NODE}", job="{JOB}", gpu="0", xid="13"}}) > 0',
              f'sum(vlm_gpu_ecc_errors_total{{node="{NODE}", job="{JOB}", gpu="0", type="corrected"}}) > 0',
              f"count(vlm_gpu_throttled{sel}) == 2"]
    _poll("the scenario's cleanups, optimizations, batch changes and freed memory reach Prometheus",
          lambda: all(_query(prometheus_url, q) for q in wanted), 60,
          lambda: "missing: " + ", ".join(q for q in wanted if not _query(prometheus_url, q)))
    (rate,) = _query(prometheus_url, render(
        next(t.expr for t in _targets() if t.panel == "Memory Optimization Success Rate"),
        {"node": NODE, "gpu": "0"}))
    assert 0 < float(rate["value"][1]) <= 100


def test_the_template_variables_offer_the_scraped_values(prometheus_url: str) -> None:
    variables = _variables()
    everything = dict.fromkeys(VARIABLES, ALL)
    expected = {"node": [NODE], "gpu": ["0", "1"], "service": ["captioner", "vlm"]}

    def offered(name: str, values: Mapping[str, str]) -> list[str]:
        return sorted(_label_values(prometheus_url, _variable_query(variables[name]), values))

    _poll("every template variable offers the scraped values",
          lambda: all(offered(n, everything) == expected[n] for n in VARIABLES), 30,
          lambda: str({n: offered(n, everything) for n in VARIABLES}))
    assert offered("gpu", {"node": "other-node"}) == []
    assert offered("service", {"node": NODE, "gpu": "1"}) == ["captioner"]


def test_every_panel_query_has_data_for_one_selected_node_gpu_and_service(prometheus_url: str) -> None:
    """Selecting single values catches a misspelt label, which the All regex .* would match anyway."""
    _all_have_data(prometheus_url, {"node": NODE, "gpu": "0", "service": "vlm"}, timeout=60)


@pytest.mark.parametrize("variable", VARIABLES)
def test_a_selection_that_excludes_everything_empties_every_query_using_it(prometheus_url: str,
                                                                            variable: str) -> None:
    _all_have_data(prometheus_url, dict.fromkeys(VARIABLES, ALL), timeout=60)
    values = {**dict.fromkeys(VARIABLES, ALL), variable: "no-such-" + variable}
    using = [t for t in _targets() if f"${variable}" in t.expr]
    assert using
    for t in using:
        assert _query(prometheus_url, render(t.expr, values)) == [], f"{t} ignores ${variable}"


def test_the_alert_rules_load_and_evaluate_against_the_optimizer(optimizer_url: str, tmp_path: Path) -> None:
    """Prometheus loads ops/alerts' rules file; every alert in it evaluates without error on real series."""
    if not RULES.exists():
        _missing_rules()
    names = {str(r["alert"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert names
    with _prometheus(tmp_path, optimizer_url.removeprefix("http://"), [RULES]) as prometheus:
        rules: list[dict[str, Any]] = []

        def evaluated() -> bool:
            status, body = _http_json(prometheus + "/api/v1/rules?type=alert")
            assert status == 200 and body["status"] == "success", body
            rules[:] = [r for g in body["data"]["groups"] for r in g["rules"]]
            return bool(rules) and all(r.get("health") != "unknown" for r in rules)

        _poll("every alert rule has been evaluated", evaluated, 30, lambda: str(rules))
        assert {r["name"] for r in rules} == names
        errors = {r["name"]: r.get("lastError") for r in rules if r.get("health") != "ok" or r.get("lastError")}
        assert errors == {}, errors
