"""Health across start and stop, reflection, and failing fast on a model that cannot be loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.app import SERVICE_NAME, RerankServer
from tests.conftest import test_config
from tests.subprocess_server import wait_for_line

ROOT = Path(__file__).resolve().parent.parent
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_not_serving_then_serving_then_not_serving(model_dir: Path, engine: Any) -> None:
    srv = RerankServer(test_config(model_dir), engine=engine)
    port = await srv.bind()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        for name in ("", SERVICE_NAME):
            assert await _health(ch, name) == NOT_SERVING  # listening, model not ready yet
        await srv.load()
        for name in ("", SERVICE_NAME):
            assert await _health(ch, name) == SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert (await watch.read()).status == SERVING
        await srv.health.enter_graceful_shutdown()  # the first step of stop()
        assert (await watch.read()).status == NOT_SERVING
        assert await _health(ch, "") == NOT_SERVING
        await srv.stop(0)


async def test_reflection_lists_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    resp = await call.read()
    await call.done_writing()
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def _run_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Online, but the hub is a closed loopback port: nothing here can reach the network.
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    return subprocess.run(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_model_directory_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    proc = _run_server("--model", str(tmp_path / "no-such-model"))
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "--model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_directory_that_is_not_a_reranker_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    proc = _run_server("--model", str(tmp_path))
    assert proc.returncode != 0
    assert "not a reranker this server can serve" in proc.stderr


def test_hub_model_without_network_fails_fast_and_says_how_to_run_offline() -> None:
    # Point the hub at a closed loopback port: the same failure as a machine with no network, but certain.
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--model", "BAAI/bge-reranker-base"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    # The server's own probe said so (not the hub client after its retries), with the way to run offline.
    assert "cannot be reached" in proc.stderr and "--model /path/to/that/directory" in proc.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_cleanly(model_dir: Path, tmp_path: Path, signame: str) -> None:
    import signal

    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--model", str(model_dir)],
            cwd=ROOT,
            stderr=out,
        )
    try:
        wait_for_line(proc, log, "serving model=")
        proc.send_signal(getattr(signal, signame))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
