"""Autoscaling and monitoring manifests (deploy/k8s/components, deploy/prometheus): rendered with every base,
validated offline against the Kubernetes API and the CRDs' published schemas, consistent with each other, and the
alert rules checked and unit-tested by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests import crd_schemas
from tests.kustomize import render
from tests.test_deploy import K8S, KUBERNETES_VERSION, OVERLAYS, of_kind

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = K8S / "components"
SCALERS = ["keda", "prometheus-adapter"]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
JOB = "reranker"  # what the PodMonitor's jobLabel gives every series, and what the queries select


def compose(tmp_path: Path, base: Path, *components: str) -> list[dict[str, Any]]:
    """What a user's overlay gives: `base` (deploy/k8s or one of its overlays) plus our components.

    The overlay lives outside deploy/k8s, as kustomize requires (a base may not contain its overlay)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(base)],
                "components": [str(COMPONENTS / c) for c in components],
            }
        )
    )
    return render(overlay)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def keda_trigger() -> dict[str, Any]:
    (trigger,) = load(COMPONENTS / "keda" / "scaledobject.yaml")["spec"]["triggers"]
    return trigger


def adapter_rule() -> dict[str, Any]:
    (rule,) = load(COMPONENTS / "prometheus-adapter" / "adapter-values.yaml")["rules"]["custom"]
    return rule


def quantity(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- rendering and schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaler", SCALERS)
@pytest.mark.parametrize("base", OVERLAYS, ids=["cpu", "gpu", "tls"])
def test_each_scaler_composes_with_every_base_and_validates(tmp_path: Path, base: Path, scaler: str) -> None:
    docs = compose(tmp_path, base, "monitoring", scaler)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "PodMonitor", "PrometheusRule"} <= set(kinds)
    assert kinds.count("HorizontalPodAutoscaler") == (0 if scaler == "keda" else 1)  # never two on one Deployment
    assert ("ScaledObject" in kinds) == (scaler == "keda")
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if crd_schemas.is_custom(doc):
            crd_schemas.validate(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{base.name}+{scaler} {name} {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize(
    ("path", "change", "problem"),
    [
        ("spec.triggers.0", lambda t: t.update(metdata=t.pop("metadata")), "metadata"),
        ("spec", lambda s: s.update(minReplicaCount="2"), "minReplicaCount"),
        ("spec", lambda s: s.update(cooldown=300), "unknown field"),
    ],
)
def test_the_crd_check_catches_a_misspelt_or_mistyped_field(path: str, change: Any, problem: str) -> None:
    doc = load(COMPONENTS / "keda" / "scaledobject.yaml")
    node: Any = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    change(node)
    with pytest.raises(crd_schemas.CrdError, match=problem):
        crd_schemas.validate(doc)


def test_the_crd_check_catches_a_bad_duration_in_an_alert() -> None:
    doc = load(COMPONENTS / "monitoring" / "prometheusrule.yaml")
    doc["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    with pytest.raises(crd_schemas.CrdError, match="for"):
        crd_schemas.validate(doc)


# --- the two scalers agree, and are slow to scale down ----------------------------------------------------------


def test_keda_replaces_the_cpu_hpa_with_the_same_bounds(tmp_path: Path) -> None:
    (cpu_hpa,) = of_kind("HorizontalPodAutoscaler")
    scaled = one(compose(tmp_path, K8S, "monitoring", "keda"), "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"] == {"name": cpu_hpa["spec"]["scaleTargetRef"]["name"]}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (
        cpu_hpa["spec"]["minReplicas"],
        cpu_hpa["spec"]["maxReplicas"],
    )
    assert keda_trigger()["type"] == "prometheus" and keda_trigger()["metricType"] == "AverageValue"


def test_the_adapter_hpa_scales_on_the_adapters_metric_only(tmp_path: Path) -> None:
    hpa = one(compose(tmp_path, K8S, "monitoring", "prometheus-adapter"), "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]  # CPU dropped: on a GPU replica it says little (README "Operations")
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert re.fullmatch(adapter_rule()["name"]["matches"], "reranker_busy_seconds_total")


def test_both_scalers_aim_at_the_same_target_on_the_same_series() -> None:
    keda_threshold = float(keda_trigger()["metadata"]["threshold"])
    hpa = load(COMPONENTS / "prometheus-adapter" / "hpa-saturation.yaml")
    assert quantity(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]) == keda_threshold
    assert 0 < keda_threshold < 1  # a share of busy time per replica
    series = re.findall(r"reranker_\w+", keda_trigger()["metadata"]["query"])
    assert series == re.findall(r"reranker_\w+", adapter_rule()["seriesQuery"]) == ["reranker_busy_seconds_total"]
    window = re.findall(r"\[(\w+)\]", keda_trigger()["metadata"]["query"])
    assert window == re.findall(r"\[(\w+)\]", adapter_rule()["metricsQuery"])


@pytest.mark.parametrize("scaler", SCALERS)
def test_scale_down_waits_longer_than_a_model_load_and_goes_one_pod_at_a_time(tmp_path: Path, scaler: str) -> None:
    docs = compose(tmp_path, K8S, "monitoring", scaler)
    if scaler == "keda":
        behavior = one(docs, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    else:
        behavior = one(docs, "HorizontalPodAutoscaler")["spec"]["behavior"]
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    startup = container["startupProbe"]
    load_budget_s = startup["periodSeconds"] * startup["failureThreshold"]  # the longest a model may take to load
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > load_budget_s
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


# --- scraping ---------------------------------------------------------------------------------------------------


def test_the_pod_monitor_scrapes_every_replicas_metrics_port_as_job_reranker(tmp_path: Path) -> None:
    docs = compose(tmp_path, K8S, "monitoring", "keda")
    monitor = one(docs, "PodMonitor")["spec"]
    pod = one(docs, "Deployment")["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"][monitor["jobLabel"]] == JOB
    (endpoint,) = monitor["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] == "metrics" and ports["metrics"] == int(
        pod["metadata"]["annotations"]["prometheus.io/port"]
    )
    assert f'job="{JOB}"' in keda_trigger()["metadata"]["query"]


# --- alerts -----------------------------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: install Debian's `prometheus` package (.ci/run does; README 'Set up')"
    return found


def test_the_prometheus_rule_holds_exactly_the_plain_rules_file() -> None:
    rule = load(COMPONENTS / "monitoring" / "prometheusrule.yaml")
    assert rule["spec"]["groups"] == load(RULES)["groups"]


def test_promtool_checks_the_rules() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_every_alert() -> None:
    alerts = {r["alert"] for g in load(RULES)["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in load(RULES_TESTS)["tests"] for t in case["alert_rule_test"]}
    fired = {
        t["alertname"] for case in load(RULES_TESTS)["tests"] for t in case["alert_rule_test"] if t.get("exp_alerts")
    }
    assert tested == alerts and fired == alerts, f"untested: {alerts - fired}"
    proc = subprocess.run(
        [promtool(), "test", "rules", RULES_TESTS.name], cwd=RULES_TESTS.parent, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_in_the_readme_with_what_to_do() -> None:
    readme = (ROOT / "README.md").read_text()
    operations = readme[readme.index("## Operations") :]
    for group in load(RULES)["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in operations, (
                f"README 'Operations' does not say what to do for {rule['alert']}"
            )
            assert rule["labels"]["severity"] in {"critical", "warning"}


def test_ci_installs_prometheus_with_the_readmes_set_up_line() -> None:
    readme = (ROOT / "README.md").read_text()
    set_up = readme[readme.index("\n## Set up\n") : readme.index("\n## Run\n")]
    (line,) = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "prometheus" in ln]
    assert f"\n{line}\n" in set_up, "README 'Set up' and .ci/run must install Prometheus with the same line"
