"""The operators' dashboard and alerts (deploy/k8s/components/monitoring): every metric they name is one the
services really export, every expression is PromQL that promtool accepts, the alerts pass their promtool
unit tests (and those tests catch a changed threshold), and the PrometheusRule is the plain rules file.

"Really export": the names come from the services' own registries as their servers build them (the stage
servicers' ``metrics``, and a real ``Gateway`` loaded on a temporary SQLite store and file result store, so
the result store's gauges are there because app.py wires them), expanded to the sample names Prometheus
stores (a counter ``x`` as ``x_total``, a histogram as ``x_bucket``, ``x_sum``, ``x_count``, ...).
tests/integration/test_metrics.py checks the same names on the real /metrics endpoints.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.decoder.server import DecoderConfig, DecoderServicer
from services.denoiser.server import DenoiserConfig, DenoiserServicer
from services.gateway.app import Gateway, GatewayConfig
from services.text_encoder.server import TextEncoderConfig, TextEncoderServicer
from tests.k8s_render import K8S, REPO, render
from tests.monitoring import (MONITORING, PROMETHEUS_OWN, PROMETHEUS_RULE, RULE_TESTS, RULES, dashboard,
                              panels, queries, recorded, rules, sample_names)
from tests.promql import PromqlLexError, metric_names, selectors
from tests.promtool import promtool

# Grafana's variables, and what each stands for when promtool checks an expression.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "6h", "namespace": ".*"}
NAMESPACE_MATCHER = ("namespace", "=~", "$namespace")
# What the dashboard must show (issue 17): a metric for each.
MUST_SHOW = {
    "queue depth by priority": "t2v_gateway_queue_depth",
    "jobs by outcome": "t2v_gateway_jobs_total",
    "time in queue": "t2v_gateway_queue_wait_seconds_bucket",
    "time per stage": "t2v_gateway_stage_duration_seconds_bucket",
    "denoiser batch size": "t2v_denoiser_batch_size_sum",
    "denoiser step time": "t2v_denoiser_step_duration_seconds_bucket",
    "GPU busy share": "t2v_denoiser_step_duration_seconds_sum",
    "cache hits": "t2v_gateway_cache_hits_total",
    "model load state": "t2v_model_loaded",
    "HTTP requests": "t2v_gateway_http_requests_total",
    "result store space": "t2v_gateway_result_store_free_bytes",
    "builds": "t2v_build_info",
}


# --- what the services export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Service name -> the sample names it exports, from the registries its server builds."""
    stage = {"port": 0, "device": "cpu"}
    found = {"text_encoder": sample_names(TextEncoderServicer(TextEncoderConfig(**stage)).metrics.registry),
             "denoiser": sample_names(DenoiserServicer(DenoiserConfig(**stage)).metrics.registry),
             "decoder": sample_names(DecoderServicer(DecoderConfig(**stage)).metrics.registry)}
    gateway = Gateway(GatewayConfig(port=0, state_dir=str(tmp_path_factory.mktemp("gateway-state"))))
    gateway.load()               # opens the stores and wires the result store's gauges, as t2v serve does
    try:
        found["gateway"] = sample_names(gateway.metrics.registry)
    finally:
        gateway.close()
    return found


@pytest.fixture(scope="module")
def known(exported: dict[str, set[str]]) -> set[str]:
    return set().union(*exported.values()) | PROMETHEUS_OWN | recorded()


def test_every_service_exports_its_build_and_the_gateway_its_new_metrics(exported: dict[str, set[str]]) -> None:
    """The fixture sees what it must: otherwise the checks below would pass on too short a list."""
    for service, names in exported.items():
        assert {"t2v_build_info", "t2v_model_loaded", "t2v_grpc_requests_total", "process_resident_memory_bytes"} \
            <= names, service
    assert {"t2v_gateway_result_store_free_bytes", "t2v_gateway_result_store_size_bytes",
            "t2v_gateway_http_requests_total", "t2v_gateway_http_request_duration_seconds_bucket"} \
        <= exported["gateway"]
    assert "t2v_denoiser_batch_size_bucket" in exported["denoiser"]
    assert "t2v_denoiser_batch_size_bucket" not in exported["gateway"]


# --- the PromQL lexer -------------------------------------------------------------------------------------

def test_the_lexer_tells_metric_names_from_everything_else() -> None:
    expr = ('sum by (le, priority) (rate(t2v_a_bucket{namespace=~"$ns", code!="OK"}[5m] offset 1h))'
            ' / on (instance) group_left (stage) foo:bar:baz and BY (z) (up) or vector(0) > bool 1'
            ' unless {__name__="t2v_c", job="x"} + count without (instance) (t2v_d[10m:1m]) * 2e3'
            ' + label_replace(t2v_e, "dst", "t2v_not_a_metric", "", "") - Inf + histogram_quantile(0.9, t2v_f)'
            ' # t2v_in_a_comment')
    assert metric_names(expr) == {"t2v_a_bucket", "foo:bar:baz", "up", "t2v_c", "t2v_d", "t2v_e", "t2v_f"}
    (first, *_) = selectors(expr)
    assert first.matchers == [("namespace", "=~", "$ns"), ("code", "!=", "OK")]
    with pytest.raises(PromqlLexError):
        selectors('t2v_a{namespace=~"unterminated}')


# --- the dashboard ----------------------------------------------------------------------------------------

def substituted(expr: str) -> str:
    """The expression as Grafana sends it, with its variables' stand-ins; an unknown variable fails."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def unknown_names(board: dict[str, Any], known: set[str]) -> dict[str, set[str]]:
    return {where: metric_names(expr) - known for where, expr in queries(board) if metric_names(expr) - known}


def test_every_dashboard_query_names_only_metrics_the_services_export(known: set[str]) -> None:
    board = dashboard()
    assert len(list(queries(board))) >= 30
    assert not unknown_names(board, known)


def test_the_name_check_catches_a_misspelt_metric(known: set[str]) -> None:
    board = dashboard()
    target = next(p for p in panels(board) if p.get("targets"))["targets"][0]
    target["expr"] = target["expr"].replace("t2v_gateway_queue_depth", "t2v_gateway_queue_lenght")
    assert unknown_names(board, known) and "t2v_gateway_queue_lenght" in set().union(*unknown_names(board, known).values())


def test_the_dashboard_shows_what_operators_asked_for() -> None:
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard())))
    missing = {topic: name for topic, name in MUST_SHOW.items() if name not in used}
    assert not missing


def test_every_dashboard_query_is_filtered_by_the_namespace_variable() -> None:
    for where, expr in queries(dashboard()):
        if where.startswith("variable"):
            continue
        for selector in selectors(expr):
            assert NAMESPACE_MATCHER in selector.matchers, f"{where}: {selector.metric} ignores $namespace"


def write_rule_file(path: Path, exprs: list[tuple[str, str]]) -> Path:
    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    return path


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exprs = [(where, substituted(expr)) for where, expr in queries(dashboard())]
    checked = promtool("check", "rules", str(write_rule_file(tmp_path / "dashboard.rules.yaml", exprs)))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout
    broken = write_rule_file(tmp_path / "broken.rules.yaml", [("x", "sum by (le (rate(t2v_model_loaded[5m]))")])
    assert promtool("check", "rules", str(broken)).returncode != 0          # the check can fail


def test_the_dashboard_is_well_formed_for_grafana() -> None:
    board = dashboard()
    assert board["uid"] == "t2v-mesh" and board["title"] and board["id"] is None   # provisioned: no database id
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["includeAll"] and variables["namespace"]["allValue"] == ".*"   # also off Kubernetes
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), f"panel {panel['id']} needs a title and a description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]


# --- the alerts -------------------------------------------------------------------------------------------

def test_the_alerts_operators_asked_for_exist() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {"T2VQueueGrowing", "T2VJobFailureRatioHigh", "T2VStageNotServing", "T2VModelNotLoaded",
            "T2VResultStoreNearlyFull"} <= set(alerts)
    assert alerts["T2VQueueGrowing"]["for"] == "10m"
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(alert["annotations"]), name


def test_every_rule_names_only_metrics_the_services_export(known: set[str]) -> None:
    for rule in rules():
        assert not metric_names(rule["expr"]) - known, rule.get("alert") or rule.get("record")


def test_the_autoscalers_read_only_metrics_the_gateway_exports(exported: dict[str, set[str]]) -> None:
    for path in ("overlays/gpu",):
        for scaled in (o for o in render(K8S / path) if o["kind"] == "ScaledObject"):
            query = scaled["spec"]["triggers"][0]["metadata"]["query"]
            assert metric_names(query) and metric_names(query) <= exported["gateway"], scaled["metadata"]["name"]


def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr


def test_the_alerts_pass_their_promtool_unit_tests() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=str(MONITORING))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])]
    for alert in (r["alert"] for r in rules() if "alert" in r):
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert}: no test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{alert}: no test where it stays quiet"


@pytest.mark.parametrize("old, new", [
    ("            > 0.1\n", "            > 0.2\n"),                          # the failure ratio's threshold
    ("        for: 10m\n        labels:\n          severity: warning\n        annotations:\n"
     "          summary: \"t2v-mesh {{ $labels.namespace }}: the queue",
     "        for: 30m\n        labels:\n          severity: warning\n        annotations:\n"
     "          summary: \"t2v-mesh {{ $labels.namespace }}: the queue"),   # the queue alert's 10 minutes
    ("max by (namespace, priority) (t2v_gateway_queue_depth)", "sum by (namespace, priority) (t2v_gateway_queue_depth)"),
    ('(sum by (namespace, stage) (t2v_model_loaded{stage=~"text_encoder|denoiser|decoder"}) == 0)\n          or ', ""),
    ("< 1073741824", "< 107374182"),
])
def test_the_unit_tests_catch_a_changed_rule(tmp_path: Path, old: str, new: str) -> None:
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    assert promtool("check", "rules", str(tmp_path / RULES.name)).returncode == 0, "the mutant must still be valid"
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=str(tmp_path))
    assert tested.returncode != 0, f"the unit tests passed with {new!r} in place of {old!r}"


def test_the_prometheus_rule_is_the_rules_file() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_prometheus_rule.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    generated = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert generated["kind"] == "PrometheusRule" and generated["spec"] == yaml.safe_load(RULES.read_text())
