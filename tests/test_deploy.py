"""The Dockerfile and the Kubernetes manifests agree with each other and with the server's defaults."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server import healthcheck
from server.app import HEALTH_SERVICES, RerankServer
from server.config import Config
from tests.conftest import test_config
from tests.kustomize import render
from tests.pki import Pki

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"  # the manifests; deploy/k8s itself, gpu/ and tls/ are kustomizations of it
OVERLAYS = [K8S, K8S / "gpu", K8S / "tls"]
KUBERNETES_VERSION = "1.33"  # the oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27)
TLS_DIR = "/etc/reranker/tls"
DEFAULTS = Config()
MODEL_MOUNT = "/home/app/model"
LEGACY_MODEL_DIR = f"{MODEL_MOUNT}/bge-reranker-base"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def exposed_ports() -> set[int]:
    return {int(p.split("/")[0]) for word, args in final_stage() if word == "EXPOSE" for p in args.split()}


def one(word: str) -> str:
    found = [args for w, args in final_stage() if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {found}"
    return found[0]


def pyproject_pin(package: str) -> str:
    match = re.search(rf'"{package}==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, f"{package} is not pinned in pyproject.toml"
    return match.group(1)


def manifests(folder: Path = BASE) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def of_kind(kind: str, folder: Path = BASE) -> list[dict[str, Any]]:
    return [d for d in manifests(folder) if d["kind"] == kind]


def container() -> dict[str, Any]:
    (deployment,) = of_kind("Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def container_env(c: dict[str, Any]) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert all(isinstance(v, str) for v in env.values()), f"Kubernetes takes env values as strings only: {env}"
    return env


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_exposes_the_servers_ports() -> None:
    env = image_env()
    assert int(env["RERANKER_PORT"]) == DEFAULTS.port == 50051
    assert exposed_ports() == {DEFAULTS.port, int(env["RERANKER_REST_PORT"]), int(env["RERANKER_METRICS_PORT"])}
    assert int(env["RERANKER_REST_PORT"]) == 6009  # the legacy REST port
    assert env["RERANKER_HOST"] == "0.0.0.0"  # reachable through the container's published ports


def test_image_env_names_are_config_fields() -> None:
    names = {f.name for f in fields(Config)}
    env_fields = {k.removeprefix("RERANKER_").lower() for k in image_env() if k.startswith("RERANKER_")}
    assert env_fields <= names


def test_image_defaults_to_the_legacy_model_path_and_declares_no_volume() -> None:
    env = image_env()
    assert env["RERANKER_MODEL"] == LEGACY_MODEL_DIR
    assert "VOLUME" not in {word for word, _ in dockerfile()}  # an anonymous volume per container otherwise


def test_image_is_quiet_and_unbuffered() -> None:
    env = image_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and env["TQDM_DISABLE"] == "1"


def test_image_runs_as_a_fixed_non_root_user() -> None:
    user, _, group = one("USER").partition(":")
    assert user.isdigit() and int(user) >= 1000 and group == user


def test_entrypoint_is_exec_form_so_signals_reach_the_server() -> None:
    assert json.loads(one("ENTRYPOINT")) == ["python", "-m", "server"]


def test_healthcheck_asks_grpc_health_with_a_short_timeout() -> None:
    args = one("HEALTHCHECK")
    options, _, command = args.partition(" CMD ")
    assert json.loads(command)[:3] == ["python", "-m", "server.healthcheck"]
    timeouts = dict(opt.split("=", 1) for opt in options.split())
    assert timeouts["--timeout"].endswith("s") and int(timeouts["--timeout"][:-1]) <= 10


def test_torch_comes_from_the_cpu_index_by_default_at_the_projects_pin() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert f"torch=={pyproject_pin('torch')}" in text


def test_dockerignore_keeps_what_the_install_needs() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert lines[lines.index("*") + 1 :], "everything is ignored and nothing let back in"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    packages = {p.rstrip("*") for p in re.findall(r'"(\w+)\*"', (ROOT / "pyproject.toml").read_text())}
    assert {"pyproject.toml", "requirements.lock", "README.md", *packages} <= kept
    # Every file the Dockerfile copies from the context by name must be let in, or the build fails at that COPY.
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    named = {src for line in copied for src in line.split() if src not in (".", "./")}
    assert named <= kept, f"the Dockerfile copies {sorted(named - kept)}, which .dockerignore leaves out"


# --- healthcheck ---------------------------------------------------------------------------------


async def test_healthcheck_exits_0_only_when_serving(model_dir: Path, engine: Any) -> None:
    srv = RerankServer(test_config(model_dir), engine=engine)
    port = await srv.bind()
    try:
        target = f"127.0.0.1:{port}"
        # The check is a blocking call; the server runs on this loop, so the check runs in a thread.
        assert await asyncio.to_thread(healthcheck.main, ["--target", target]) == 1  # loading
        await srv.load()
        for service in HEALTH_SERVICES:
            assert await asyncio.to_thread(healthcheck.main, ["--target", target, "--service", service]) == 0
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.healthcheck", cwd=ROOT, env={**os.environ, "RERANKER_PORT": str(port)}
        )
        assert await proc.wait() == 0  # the container's command: the port comes from RERANKER_PORT
        await srv.health.enter_graceful_shutdown()
        assert await asyncio.to_thread(healthcheck.main, ["--target", target]) == 1
    finally:
        await srv.stop(0)


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        assert healthcheck.check(f"127.0.0.1:{port}", timeout=2) == "UNAVAILABLE"


def test_healthcheck_names_a_bad_environment_value_in_one_line() -> None:
    env = {**os.environ, "RERANKER_FP16": "maybe"}
    done = subprocess.run([sys.executable, "-m", "server.healthcheck"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "python -m server.healthcheck: error: RERANKER_FP16='maybe': not a boolean: use 1/true/yes/on or 0/false/no/off"
    ]


# --- Kubernetes ----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def test_container_ports_match_the_image() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports.values()) == exposed_ports()
    env = image_env()
    assert ports == {
        "grpc": DEFAULTS.port,
        "http": int(env["RERANKER_REST_PORT"]),
        "metrics": int(env["RERANKER_METRICS_PORT"]),
    }
    pod_env = container_env(c)
    assert int(pod_env["RERANKER_PORT"]) == ports["grpc"]
    assert int(pod_env["RERANKER_REST_PORT"]) == ports["http"]
    assert int(pod_env["RERANKER_METRICS_PORT"]) == ports["metrics"]


def test_pod_env_names_are_config_fields_and_parse() -> None:
    from server.config import load_config

    pod_env = container_env(container())
    names = {f.name for f in fields(Config)}
    assert {k.removeprefix("RERANKER_").lower() for k in pod_env} <= names
    config = load_config([], env=pod_env)
    assert config.model == image_env()["RERANKER_MODEL"] == LEGACY_MODEL_DIR


def test_probes_ask_grpc_health_on_the_grpc_port() -> None:
    c = container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = c[probe]["grpc"]
        assert grpc_probe["port"] == DEFAULTS.port, probe
        assert grpc_probe.get("service", "") in HEALTH_SERVICES, probe
    # Startup allows minutes for loading; liveness never restarts a pod that is merely busy for a moment.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert c["livenessProbe"]["timeoutSeconds"] >= 3


def test_shutdown_fits_in_the_termination_grace_period() -> None:
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace_s = float(container_env(c).get("RERANKER_GRACE_S", DEFAULTS.grace_s))
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace_s


def test_pod_runs_as_the_images_user_with_the_model_mounted_read_only() -> None:
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    uid = int(one("USER").partition(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert mounts[MODEL_MOUNT]["readOnly"] is True
    assert "/home/app/.cache" in mounts  # HF_HOME stays writable under a read-only root filesystem
    assert image_env()["HF_HOME"].startswith("/home/app/.cache/")


def test_resources_are_requested_and_threads_fit_the_cpu_limit() -> None:
    c = container()
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)
    assert 0 < int(container_env(c)["RERANKER_THREADS"]) <= int(limits["cpu"])


def test_image_name_and_tag_follow_the_project_version() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image["name"] == container()["image"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and image["newTag"] == version.group(1)
    gpu = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert gpu["images"] == [{"name": image["name"], "newTag": f"{version.group(1)}-cuda"}]


def test_services_select_the_pods_and_name_their_ports() -> None:
    (deployment,) = of_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"]: p["containerPort"] for p in container()["ports"]}
    services = {s["metadata"]["name"]: s["spec"] for s in of_kind("Service")}
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        for p in spec["ports"]:
            assert port_names[p["targetPort"]] == p["port"]
    headless = [s for s in services.values() if s.get("clusterIP") == "None"]
    assert len(headless) == 1 and [p["port"] for p in headless[0]["ports"]] == [DEFAULTS.port]
    normal = [s for s in services.values() if s.get("clusterIP") != "None"]
    assert len(normal) == 1 and {p["port"] for p in normal[0]["ports"]} == {port_names["http"], port_names["metrics"]}


def test_hpa_and_pdb_target_the_deployment() -> None:
    (deployment,) = of_kind("Deployment")
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "reranker"}
    assert deployment["metadata"]["name"] == "reranker"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = of_kind("PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_gpu_overlay_asks_for_one_gpu_and_cuda() -> None:
    kustomization = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../base"]
    (patch_ref,) = kustomization["patches"]
    patch = yaml.safe_load((K8S / "gpu" / patch_ref["path"]).read_text())
    (deployment,) = of_kind("Deployment")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", deployment["metadata"]["name"])
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    assert c["name"] == container()["name"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = container_env(c)
    assert env["RERANKER_DEVICE"] == "cuda"
    assert Config(device=env["RERANKER_DEVICE"]).device == "cuda"
    assert 0 < int(env["RERANKER_THREADS"]) <= int(c["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("folder", [BASE, K8S / "gpu", K8S / "tls"], ids=["base", "gpu", "tls"])
def test_manifests_are_well_formed(folder: Path) -> None:
    for doc in manifests(folder):
        assert {"apiVersion", "kind"} <= set(doc), doc
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]


def test_an_empty_model_directory_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    # `docker run -v /missing/on/host:/home/app/model/bge-reranker-base` mounts an empty directory.
    from server.engine.model import ModelLoadError, resolve_model_path

    with pytest.raises(ModelLoadError, match="has no config.json.*--model"):
        resolve_model_path(str(tmp_path))


def test_the_images_entrypoint_and_env_serve_grpc_and_rest(model_dir: Path, tmp_path: Path) -> None:
    """The image's ENTRYPOINT and ENV, run here without Docker: only paths and ports are changed."""
    import signal
    import time
    import urllib.request

    from tests.subprocess_server import free_port

    grpc_port, rest_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in image_env().items() if k != "PATH"}
    env.update(
        RERANKER_MODEL=str(model_dir),
        RERANKER_HOST="127.0.0.1",  # loopback only in tests
        RERANKER_PORT=str(grpc_port),
        RERANKER_REST_PORT=str(rest_port),
        RERANKER_METRICS_PORT=str(metrics_port),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    env = {**os.environ, **env}
    entrypoint = json.loads(one("ENTRYPOINT"))
    healthcheck_cmd = json.loads(one("HEALTHCHECK").partition(" CMD ")[2])
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, *entrypoint[1:]], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([sys.executable, *healthcheck_cmd[1:]], cwd=ROOT, env=env, capture_output=True).returncode:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "not SERVING after 120 s"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/health", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- Kubernetes: rendered, against the API schemas --------------------------------------------------------


@pytest.mark.parametrize("folder", OVERLAYS, ids=["cpu", "gpu", "tls"])
def test_rendered_manifests_validate_against_the_kubernetes_api_schemas(folder: Path) -> None:
    docs = render(folder)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs:  # strict: an unknown or misspelt field fails too
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{folder.name} {doc['kind']}/{doc['metadata']['name']} {path}: {exc.message}")


def _rendered_container(folder: Path) -> dict[str, Any]:
    (deployment,) = [d for d in render(folder) if d["kind"] == "Deployment"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_overlays_keep_the_base_and_change_only_what_they_say() -> None:
    base, gpu, tls = (_rendered_container(f) for f in OVERLAYS)
    assert gpu["image"].endswith("-cuda") and gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container_env(gpu)["RERANKER_MODEL"] == container_env(base)["RERANKER_MODEL"]  # env merged by name
    assert gpu["startupProbe"] == base["startupProbe"]
    assert tls["image"] == base["image"] and tls["ports"] == base["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handlers = {"grpc", "exec", "httpGet", "tcpSocket"} & set(tls[probe])
        assert handlers == {"exec"}, f"{probe} must have exactly one handler, got {handlers}"


def _tls_pod_env(tls_dir: Path) -> dict[str, str]:
    env = container_env(_rendered_container(K8S / "tls"))
    return {k: v.replace(TLS_DIR, str(tls_dir)) for k, v in env.items()}


def test_tls_overlay_mounts_the_secret_where_the_env_points() -> None:
    (deployment,) = [d for d in render(K8S / "tls") if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["tls"]["mountPath"] == TLS_DIR and mounts["tls"]["readOnly"] is True
    assert volumes["tls"]["secret"]["secretName"] == "reranker-tls"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # the key is group-readable
    env = container_env(c)
    assert {env["RERANKER_TLS_CERT"], env["RERANKER_TLS_KEY"]} == {f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key"}
    assert {f.name for f in fields(Config)} >= {k.removeprefix("RERANKER_").lower() for k in env}


async def test_tls_overlays_probes_pass_against_a_tls_server(
    model_dir: Path, engine: Any, pki: Pki, tmp_path: Path
) -> None:
    """Each probe command of the rendered TLS Deployment, run as the kubelet would, with the Secret's files."""
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for name, source in (("tls.crt", pki.server_cert), ("tls.key", pki.server_key), ("ca.crt", pki.ca)):
        (tls_dir / name).write_bytes(source.read_bytes())
    env = _tls_pod_env(tls_dir)
    srv = RerankServer(
        test_config(model_dir, tls_cert=env["RERANKER_TLS_CERT"], tls_key=env["RERANKER_TLS_KEY"]), engine
    )
    await srv.start()
    try:
        probe_env = {**os.environ, **env, "RERANKER_HOST": "127.0.0.1", "RERANKER_PORT": str(srv.port)}
        probe_env["RERANKER_MODEL"] = str(model_dir)
        c = _rendered_container(K8S / "tls")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = [arg.replace(TLS_DIR, str(tls_dir)) for arg in c[probe]["exec"]["command"]]
            assert command[:3] == ["python", "-m", "server.healthcheck"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *command[1:], cwd=ROOT, env=probe_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            out, _ = await proc.communicate()
            assert await proc.wait() == 0, f"{probe}: {out.decode()}"
            assert out.decode().strip().endswith(": SERVING")
    finally:
        await srv.stop(0)


def test_an_overlay_inside_its_own_base_is_refused_as_kubectl_does(tmp_path: Path) -> None:
    """kubectl 1.32 refused `kubectl apply -k deploy/k8s/gpu` while gpu/ lay inside its base; the renderer the tests
    use now applies the same rule, so the layout of deploy/k8s cannot regress unseen."""
    (tmp_path / "inner").mkdir()
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["cm.yaml"]}))
    (tmp_path / "cm.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    )
    (tmp_path / "inner" / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [".."]}))
    assert [d["kind"] for d in render(tmp_path)] == ["ConfigMap"]
    with pytest.raises(AssertionError, match="cycle detected"):
        render(tmp_path / "inner")
