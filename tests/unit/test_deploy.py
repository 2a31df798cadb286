"""deploy/ parses, agrees with itself and the settings, and passes promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_refs import (
    COMPOSE,
    DEPLOY,
    KEDA,
    MANIFEST,
    ROOT,
    RULES,
    RULES_TEST,
    alert_rules,
    dashboard,
    dashboard_exprs,
    load_yaml_documents,
    used_label_values,
    used_queues,
)
from worker.outcome import Action, Kind, Reason
from worker.settings import Settings, load_settings

#: Read at import: the unit tests' autouse fixture hides MEMORY_WORKER_* variables.
PROMTOOL_DIR = Path(
    os.environ.get("MEMORY_WORKER_PROMTOOL_DIR", Path.home() / ".cache/memory-worker/promtool")
)
IN_CI = bool(os.environ.get("CI"))


def _docs(path: Path) -> dict[str, dict[str, Any]]:
    """A multi-document manifest by kind."""
    return {doc["kind"]: doc for doc in load_yaml_documents(path) if doc}


def _settings_from(text: str, tmp_path: Path) -> Settings:
    path = tmp_path / "mahavishnu.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(config=str(path))


@pytest.fixture
def defaults() -> Settings:
    """The committed settings file: the defaults every deploy file must agree with."""
    return load_settings(config=str(ROOT / "settings" / "mahavishnu.yaml"))


@pytest.fixture
def configmap(tmp_path: Path) -> Settings:
    """The Kubernetes ConfigMap's settings file, loaded like the worker loads it."""
    text = _docs(MANIFEST)["ConfigMap"]["data"]["mahavishnu.yaml"]
    return _settings_from(text, tmp_path)


@pytest.fixture
def compose() -> dict[str, Any]:
    """The compose file."""
    (doc,) = load_yaml_documents(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def _container(kind_docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = kind_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_every_manifest_parses() -> None:
    """Every YAML file under deploy/ is valid YAML, and the dashboard is valid JSON."""
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert load_yaml_documents(path), path
    assert dashboard()["uid"] == "memory-worker"


def test_configmap_is_valid_settings_and_agrees_with_the_defaults(configmap, defaults) -> None:
    """The ConfigMap loads as settings and names the same exchange, queues and port."""
    for field in ("exchange", "queue", "dead_letter_queue", "queue_type"):
        assert getattr(configmap.rabbitmq, field) == getattr(defaults.rabbitmq, field), field
    assert configmap.worker.ops_port == defaults.worker.ops_port == 9464


def test_termination_grace_exceeds_the_drain_grace(configmap, defaults, compose) -> None:
    """The kubelet and compose wait longer than the worker drains, so SIGKILL never cuts it."""
    pod = _docs(MANIFEST)["Deployment"]["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > configmap.worker.grace_s
    assert grace > defaults.worker.grace_s
    for name in ("worker-1", "worker-2"):
        stop = compose["services"][name]["stop_grace_period"]
        assert int(stop.removesuffix("s")) > defaults.worker.grace_s


def test_deployment_ports_probes_and_resources(configmap) -> None:
    """Probes use /healthz and /readyz on the ops port the ConfigMap sets; requests are set."""
    docs = _docs(MANIFEST)
    container = _container(docs)
    (port,) = container["ports"]
    assert port == {"name": "ops", "containerPort": configmap.worker.ops_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert docs["Service"]["spec"]["ports"][0]["port"] == configmap.worker.ops_port
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Service", "PodMonitor"):
        spec = docs[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind


def test_scaledobject_reads_the_work_queue_over_http(configmap) -> None:
    """KEDA scales the Deployment on the ConfigMap's work queue, through the management API."""
    keda = _docs(KEDA)
    manifest = _docs(MANIFEST)
    scaled = keda["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == manifest["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq" and meta["protocol"] == "http"
    assert meta["queueName"] == configmap.rabbitmq.queue != configmap.rabbitmq.dead_letter_queue
    # Above what one pod holds unacked, or its own prefetch alone would ask for more pods.
    assert meta["mode"] == "QueueLength" and int(meta["value"]) > configmap.prefetch
    assert int(meta["activationValue"]) >= 0
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    auth = keda["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secrets = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for env in _container(manifest)["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} <= secrets


def test_compose_runs_the_rabbitmq_the_tests_run_on(compose) -> None:
    """The compose broker is a 4.3-or-later management image, as `make test-rabbitmq4` tests."""
    image = compose["services"]["rabbitmq"]["image"]
    match = re.fullmatch(r"rabbitmq:(\d+)\.(\d+)(?:\.\d+)?-management", image)
    assert match is not None, image
    assert (int(match[1]), int(match[2])) >= (4, 3), image


def test_compose_workers_keep_the_exit_78_wrapper_and_agree_on_ports(compose, defaults) -> None:
    """Two workers, each with the exit-78 wrapper, an ops port Prometheus scrapes and publishes."""
    services = compose["services"]
    assert {"rabbitmq", "session-buddy", "worker-1", "worker-2", "prometheus", "grafana"} <= set(
        services
    )
    (prom_doc,) = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prom_doc["scrape_configs"]}
    targets = {t for c in jobs["memory-worker"]["static_configs"] for t in c["targets"]}
    published = set(services["session-buddy"]["ports"])
    ports = []
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        script = "\n".join(worker["entrypoint"])
        assert "memory-worker run" in script and "-eq 78" in script
        env = worker["environment"]
        assert env["MAHAVISHNU_WORKER__ID"] == name
        port = int(env["MAHAVISHNU_WORKER__OPS_PORT"])
        ports.append(port)
        assert f"session-buddy:{port}" in targets
        assert f"127.0.0.1:{port}:{port}" in published
        assert env["MAHAVISHNU_RABBITMQ__URL"].endswith("@rabbitmq:5672/")
        assert env["MAHAVISHNU_POOLS__SESSION_BUDDY_URL"] == "http://127.0.0.1:8678/mcp"
        assert worker["network_mode"] == "service:session-buddy"
    assert ports[0] == defaults.worker.ops_port and len(set(ports)) == 2
    rabbit = jobs["rabbitmq"]
    assert rabbit["metrics_path"] == "/metrics/detailed"
    assert rabbit["static_configs"][0]["targets"] == ["rabbitmq:15692"]


def _mounted_files(compose: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """Host path -> (file, where it is mounted), for every bind mount of the compose file."""
    mounts = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                mounts[source] = ((COMPOSE.parent / source).resolve(), target)
    return mounts


def test_every_file_compose_loads_exists_and_is_checked(compose) -> None:
    """Each mounted file and build context exists, and the mounts line up with the configs."""
    mounts = _mounted_files(compose)
    for path, _ in mounts.values():
        assert path.exists(), path
    for service in compose["services"].values():
        if "build" in service:
            build = service["build"]
            context = COMPOSE.parent / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    assert (DEPLOY / "session-buddy" / "Dockerfile").read_text().count("session-buddy==") == 1
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    (prom_doc,) = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")
    config_dir = Path(mounts["./prometheus/prometheus.yml"][1]).parent
    rule_targets = {target for _, target in mounts.values()}
    assert {str(config_dir / name) for name in prom_doc["rule_files"]} <= rule_targets
    (provider,) = load_yaml_documents(
        DEPLOY / "grafana" / "provisioning" / "dashboards" / "memory-worker.yml"
    )[0]["providers"]
    dashboard_target = mounts["./grafana/memory-worker.json"][1]
    assert dashboard_target.startswith(provider["options"]["path"] + "/")
    (datasource,) = load_yaml_documents(
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    )[0]["datasources"]
    assert datasource["url"] == "http://prometheus:9090"


def test_queue_names_in_the_rules_and_dashboard_are_the_settings_defaults(defaults) -> None:
    """The queues the rules and the dashboard's defaults select are the settings' queues."""
    assert used_queues() == {defaults.rabbitmq.queue, defaults.rabbitmq.dead_letter_queue}
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["queue"]["query"] == defaults.rabbitmq.queue
    assert variables["dlq"]["query"] == defaults.rabbitmq.dead_letter_queue
    retry = [e for e in dashboard_exprs() if "retry" in e and "rabbitmq_" in e]
    # The tier queues are <queue>.retry.<N>s (worker/topology.py).
    assert retry and all(f"{defaults.rabbitmq.queue}\\\\.retry\\\\." in e for e in retry)


def test_label_values_are_ones_the_worker_uses() -> None:
    """Every outcome, action and reason the PromQL matches is one the worker sets."""
    known = {
        "outcome": {k.value for k in Kind},
        "action": {a.value for a in Action},
        "reason": {r.value for r in Reason} | {""},
    }
    for (name, label), values in used_label_values().items():
        assert name == "memory_worker_messages_total", name
        assert values <= known[label], (label, values - known[label])


def test_dashboard_has_variables_rows_and_no_overlapping_panels() -> None:
    """Data source and worker variables, every query on the data source variable, a repeated
    per-worker row, and panels that do not overlap on the 24-column grid."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query" and variables["instance"]["includeAll"]
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not mine & cells, panel["title"]
        cells |= mine
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert any(p["type"] == "row" and p.get("repeat") == "instance" for p in board["panels"])


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert's runbook points to a heading that exists in docs/operators.md."""
    anchors = _anchors((ROOT / "docs" / "operators.md").read_text(encoding="utf-8"))
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operators.md" and anchor in anchors, rule["alert"]


def _promtool() -> str:
    """The promtool to use; skipped without one, failed in CI."""
    found = shutil.which("promtool") or str(PROMTOOL_DIR / "root" / "usr" / "bin" / "promtool")
    if Path(found).is_file():
        return found
    message = "no promtool: run tests/promtool/prepare.sh (or make promtool)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_and_tests_the_rules() -> None:
    """`promtool check rules` accepts the rules and `promtool test rules` passes."""
    promtool = _promtool()
    assert "SUCCESS" in _run(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in _run(promtool, "test", "rules", str(RULES_TEST))
    _run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL (checked as recording rules)."""
    promtool = _promtool()
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert "SUCCESS" in _run(promtool, "check", "rules", str(path))
