"""What the files under deploy/ refer to: metric names and labels in PromQL, queues, ports.

Shared by tests/unit/test_deploy.py (the files agree with each other and with the settings)
and tests/integration/test_deploy_metrics.py (a running worker exports what they use).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "memory-worker.json"
RULES = DEPLOY / "prometheus" / "memory-worker.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "memory-worker.rules.test.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
MANIFEST = DEPLOY / "kubernetes" / "memory-worker.yaml"
KEDA = DEPLOY / "kubernetes" / "keda.yaml"

#: The worker's own metric families; everything else in the PromQL comes from RabbitMQ.
WORKER_PREFIXES = ("memory_worker_", "process_")
#: Labels Prometheus adds at scrape time (or the histogram adds), not the worker.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "le"}
#: Grafana's variables, replaced by values that parse as PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$instance": "worker-1",
    "$queue": "memory.items",
    "$dlq": "memory.items.dlq",
}

_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "and", "or",
    "unless", "rate", "increase", "delta", "histogram_quantile", "min_over_time", "time",
    "vector", "clamp_min", "group_left", "group_right", "bool", "offset",
}  # fmt: skip
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def load_yaml_documents(path: Path) -> list[Any]:
    """Every YAML document in a file."""
    return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_exprs() -> list[str]:
    """Every panel query of the dashboard, with Grafana's variables filled in."""
    exprs = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            exprs.append(expr)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of the alert rules file."""
    (doc,) = load_yaml_documents(RULES)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_exprs() -> list[str]:
    """The PromQL of the dashboard and of the alert rules."""
    return dashboard_exprs() + [rule["expr"] for rule in alert_rules()]


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value}) of each series selector in a PromQL expression."""
    found = []
    text = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors: [5m]
    text = _GROUPING.sub("", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: m.group(0).replace(" ", "_"), text)
    for match in _SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(2) or ""
        end = match.end()
        if name in _PROMQL_WORDS or text[end : end + 1] == "(" or name.replace(".", "").isdigit():
            continue
        if not braces and not name.startswith(("memory_worker_", "process_", "rabbitmq_")):
            continue
        found.append((name, {m.group(1): m.group(3) for m in _MATCHER.finditer(braces)}))
    return found


def grouping_labels(expr: str) -> set[str]:
    """Labels named in `by (...)`, `on (...)` and the like."""
    return {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",")} - {""}


def used_worker_metrics() -> dict[str, set[str]]:
    """Worker metric name -> labels the dashboard and rules select or group it by."""
    used: dict[str, set[str]] = {}
    for expr in all_exprs():
        grouped = grouping_labels(expr)
        for name, matchers in selectors(expr):
            if name.startswith(WORKER_PREFIXES):
                labels = used.setdefault(name, set())
                labels.update(set(matchers) - TARGET_LABELS)
                # A `by (reason)` over a worker metric is a label the worker must carry;
                # `vhost`/`queue` belong to the RabbitMQ side of an expression.
                labels.update(grouped - TARGET_LABELS - {"vhost", "queue"})
    return used


def used_label_values() -> dict[tuple[str, str], set[str]]:
    """(worker metric, label) -> values the dashboard and rules match exactly."""
    values: dict[tuple[str, str], set[str]] = {}
    for expr in all_exprs():
        for name, matchers in selectors(expr):
            if name.startswith(WORKER_PREFIXES):
                for label, value in matchers.items():
                    if label not in TARGET_LABELS:
                        values.setdefault((name, label), set()).add(value)
    return values


def used_queues() -> set[str]:
    """Every queue name the dashboard's defaults and the rules select exactly."""
    return {
        matchers["queue"]
        for expr in all_exprs()
        for name, matchers in selectors(expr)
        if name.startswith("rabbitmq_") and "queue" in matchers and "\\" not in matchers["queue"]
    }
