"""What the monitoring tests share: the dashboard's and the rules' expressions, and the sample names a
registry or a /metrics text exposes (tests/unit/test_monitoring.py, tests/integration/test_metrics.py)."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import yaml

from tests.k8s_render import K8S
from tests.promql import metric_names

MONITORING = K8S / "components" / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "t2v-mesh.json"
RULES = MONITORING / "t2v-mesh.rules.yaml"
RULE_TESTS = MONITORING / "t2v-mesh.rules.test.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
# Series Prometheus makes itself, which an expression may read besides the services' own.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Sample names of each metric type, as Prometheus stores them (prometheus_client names a counter's family
# without its _total).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}


def sample_names(registry: Any) -> set[str]:
    """Every sample name a registry exposes (or will, once its labelled series exist)."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
        names |= {sample.name for sample in family.samples}
    return names


def exposition_names(text: str) -> set[str]:
    """Every sample name a /metrics text declares (its ``# TYPE`` lines), or will once its series exist."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names |= {base + suffix for suffix in SUFFIXES[kind]}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(METRIC, LABEL))."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert found, f"variable {variable['name']}: only label_values(METRIC, LABEL) is checked here"
            yield f"variable {variable['name']}", found.group(1)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    """The names the recording rules make (an alert may read them)."""
    return {rule["record"] for rule in rules() if "record" in rule}


def names_used() -> dict[str, set[str]]:
    """Where (a panel's target, a variable, a rule) -> the metric names its expression reads."""
    used = {where: metric_names(expr) for where, expr in queries(dashboard())}
    used.update({f"rule {r.get('alert') or r.get('record')}": metric_names(r["expr"]) for r in rules()})
    return used
