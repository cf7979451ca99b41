"""The scaling queries, proven against a real Prometheus (Debian's package) scraping two real replicas.

Replica A serves three models, replica B one; load on one of A's models must raise the saturation of A (and of that
model only) past the autoscaler's target, as the ScaledObject's query and the adapter's rule compute it, while B
stays idle, and bring it back under the target once the load stops. Every metric name the manifests, the alert
rules and the README use must be served. Loopback only; bounded in time; everything is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from tests.prometheus_server import Prometheus
from tests.subprocess_server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "deploy" / "k8s" / "components"
SCALED_OBJECT = yaml.safe_load((COMPONENTS / "keda" / "scaledobject.yaml").read_text())
(TRIGGER,) = SCALED_OBJECT["spec"]["triggers"]
KEDA_QUERY = TRIGGER["metadata"]["query"]
THRESHOLD = float(TRIGGER["metadata"]["threshold"])
(ADAPTER_RULE,) = yaml.safe_load((COMPONENTS / "prometheus-adapter" / "adapter-values.yaml").read_text())["rules"][
    "custom"
]
NAMESPACE = "reranker-test"
PODS = {"a": "reranker-a", "b": "reranker-b"}
RISE_S = 150  # rate(...[1m]) needs most of a minute of load to pass the target, and a busy CI machine is slow
FALL_S = 120


def adapter_query(pods: list[str]) -> str:
    """The adapter rule's metricsQuery as prometheus-adapter expands it for `pods/<name>` of these pods."""
    series = re.match(r"\w+", ADAPTER_RULE["seriesQuery"])
    assert series
    matchers = f'pod=~"{"|".join(pods)}",namespace="{NAMESPACE}"'
    query = ADAPTER_RULE["metricsQuery"]
    for name, value in (("Series", series.group(0)), ("LabelMatchers", matchers), ("GroupBy", "pod")):
        query = query.replace(f"<<.{name}>>", value)
    assert "<<" not in query, f"a template field the test does not expand: {query}"
    return query


@pytest.fixture(scope="module")
def fleet(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("prometheus")
    ports = {"a": free_port(), "b": free_port()}
    with contextlib.ExitStack() as stack:
        replicas = {}
        for key, models in (("a", ["--model", f"first={model_dir}", "--model", f"second={model_dir}"]), ("b", [])):
            replica = ServerProcess(  # with the REST port, as the Deployment runs it (its metrics come with it)
                model_dir, tmp / f"{key}.log", *models, "--metrics-port", str(ports[key]),
                "--rest-port", str(free_port()), "--max-queue-pairs", "4096",
            )  # fmt: skip
            stack.callback(replica.stop)
            replicas[key] = replica
        prometheus = Prometheus(
            tmp,
            "reranker",  # the job the PodMonitor's jobLabel gives, which the ScaledObject's query selects
            {f"127.0.0.1:{ports[k]}": {"namespace": NAMESPACE, "pod": PODS[k]} for k in PODS},
        )
        stack.callback(prometheus.stop)
        yield {"replicas": replicas, "prometheus": prometheus, "metrics_ports": ports, "default_model": model_dir.name}


async def _load(target: str, stop: asyncio.Event, answered: list[int]) -> None:
    """4 clients sending 1 x 100 to model `first` of replica A (which also serves `second` and the default one)."""
    passage = " ".join(["the giant panda is a bear species endemic to China"] * 3)
    request = pb.RerankRequest(query="what is a panda?", candidates=[passage] * 100, model="first")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RerankerStub(channel)

        async def client() -> None:
            while not stop.is_set():
                await stub.Rerank(request, timeout=60)
                answered.append(1)

        await asyncio.gather(*(client() for _ in range(4)))


async def _poll(prometheus: Prometheus, until: Any, timeout_s: float) -> list[dict[str, Any]]:
    """Readings of both queries every 2 s until `until(reading)` or `timeout_s`; all readings, the last one first."""
    readings: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        keda = await asyncio.to_thread(prometheus.values, KEDA_QUERY)
        per_pod = await asyncio.to_thread(prometheus.values, adapter_query(list(PODS.values())), "pod")
        per_model = await asyncio.to_thread(
            prometheus.values, f'sum by (model) (rate(reranker_busy_seconds_total{{pod="{PODS["a"]}"}}[1m]))', "model"
        )
        reading = {"keda": keda.get("", 0.0), "pods": per_pod, "models": per_model, "t": time.monotonic()}
        readings.insert(0, reading)
        if until(reading) or time.monotonic() > deadline:
            return readings
        await asyncio.sleep(2)


async def test_saturation_rises_past_the_target_on_the_loaded_replica_and_falls_back(fleet: dict[str, Any]) -> None:
    prometheus: Prometheus = fleet["prometheus"]
    a, b = PODS["a"], PODS["b"]
    # Both replicas scraped, SERVING, and the rate has two samples of each.
    ready = await _poll(prometheus, lambda r: set(r["pods"]) == {a, b} and r["models"].keys() >= {"first"}, 60)
    assert set(ready[0]["pods"]) == {a, b}, f"not both replicas in Prometheus:\n{prometheus.log()}"
    serving = await asyncio.to_thread(prometheus.values, 'reranker_serving{job="reranker"}', "pod")
    assert serving == {a: 1.0, b: 1.0}
    assert ready[0]["keda"] < THRESHOLD
    # Discovery: the adapter's seriesQuery finds one series per model per replica.
    found = await asyncio.to_thread(prometheus.query, ADAPTER_RULE["seriesQuery"])
    default = fleet["default_model"]
    pairs = {(s["metric"]["pod"], s["metric"]["model"]) for s in found}
    assert pairs == {(a, default), (a, "first"), (a, "second"), (b, default)}

    stop, answered = asyncio.Event(), []
    load = asyncio.ensure_future(_load(fleet["replicas"]["a"].target, stop, answered))
    try:
        rise = await _poll(prometheus, lambda r: r["keda"] > THRESHOLD and r["pods"].get(a, 0) > THRESHOLD, RISE_S)
    finally:
        stop.set()
        await load
    peak = rise[0]
    assert peak["keda"] > THRESHOLD, f"saturation never passed {THRESHOLD}: {[r['keda'] for r in rise]}"
    assert peak["pods"][a] > THRESHOLD and peak["pods"].get(b, 0.0) < 0.05, peak  # only the loaded replica
    assert peak["models"]["first"] > THRESHOLD and peak["models"].get("second", 0.0) < 0.05, peak  # only its model
    assert answered, "no request was answered under load"

    fall = await _poll(prometheus, lambda r: r["keda"] < THRESHOLD and r["pods"].get(a, 0) < THRESHOLD, FALL_S)
    assert fall[0]["keda"] < THRESHOLD and fall[0]["pods"][a] < THRESHOLD, [r["keda"] for r in fall]
    assert fall[0]["keda"] < peak["keda"]


def test_every_alert_expression_evaluates(fleet: dict[str, Any]) -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            fleet["prometheus"].query(rule["expr"])  # a query Prometheus refuses fails the test, naming it


def served_names(port: int) -> set[str]:
    """Every metric and series name on /metrics, including a histogram's _bucket/_sum/_count without samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else None]


def test_every_metric_name_the_manifests_and_readme_use_is_served(fleet: dict[str, Any]) -> None:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in COMPONENTS.rglob("*.yaml")}
    texts |= {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "deploy" / "prometheus").glob("*.yml")}
    texts |= {f"README.md ({title})": readme_section(title) for title in ("Metrics", "Operations")}
    used: dict[str, set[str]] = {}
    for where, text in texts.items():
        for name in re.findall(r"\breranker_[a-z0-9_]+\b", text):
            used.setdefault(name, set()).add(where)
    served = served_names(fleet["metrics_ports"]["a"])
    adapters = {ADAPTER_RULE["name"]["as"]}  # the adapter's own name for a served series
    missing = {name: sorted(where) for name, where in used.items() if name not in served | adapters}
    assert not missing, f"names used but not served on /metrics: {missing}"
    assert {"reranker_busy_seconds_total", "reranker_serving", "reranker_queue_seconds_bucket"} <= set(used)
