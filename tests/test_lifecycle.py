"""Health across start and stop, reflection, and failing fast on a model that cannot be loaded."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.__main__ import serve
from server.app import SERVICE_NAME, RerankServer
from server.config import Config, ConfigError
from tests.conftest import FP32_REORDERED, test_config
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


async def _serve(config: Config) -> int:
    """`python -m server`'s serve() in this process (no model is loaded when it fails early), its handlers removed."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(serve(config), 60)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def test_a_grpc_or_rest_port_in_use_fails_with_a_clear_message(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert await _serve(test_config(model_dir, port=port)) == 1
        assert f"cannot start: cannot listen on 127.0.0.1:{port} for gRPC: the port is in use" in caplog.text
        assert await _serve(test_config(model_dir, rest_port=port)) == 1
        assert f"cannot start: REST bridge on 127.0.0.1:{port}: " in caplog.text
    assert "Traceback" not in caplog.text


def test_max_length_above_the_models_limit_is_refused_at_load(model_dir: Path) -> None:
    from server.engine.model import ModelLoadError, RerankerModel

    with pytest.raises(ModelLoadError, match="--max-length 513 is above the model's limit of 512 tokens"):
        RerankerModel(test_config(model_dir, max_length=513))


async def test_device_cuda_without_cuda_fails_to_start_clearly(
    model_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whether or not it has a GPU
    assert await _serve(test_config(model_dir, device="cuda")) == 1
    assert "cannot start: --device cuda was asked for, but CUDA is not available on this machine" in caplog.text
    assert "Traceback" not in caplog.text


def test_cuda_device_numbers_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from server.engine.model import ModelLoadError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two devices, as far as the server can tell
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [pick_device(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    with pytest.raises(ModelLoadError, match=r"--device cuda:2: only 2 CUDA device\(s\) visible"):
        pick_device("cuda:2")


def test_a_malformed_cuda_device_is_refused_by_the_config() -> None:
    for device in ("cuda:x", "cudax", "cuda:-1"):
        with pytest.raises(ConfigError, match="device must be"):
            Config(device=device)


async def test_sigterm_while_the_model_loads_stops_cleanly(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loading = asyncio.Event()

    async def never_done(self: RerankServer, name: str, spec: str) -> object:  # a large model, still loading
        loading.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(RerankServer, "load_engine", never_done)
    with caplog.at_level(logging.INFO, logger="server"):
        serving = asyncio.ensure_future(_serve(test_config(model_dir)))
        await asyncio.wait_for(loading.wait(), 30)
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop, as python -m server does
        assert await asyncio.wait_for(serving, 30) == 0
    assert "signal received" in caplog.text and "stopped" in caplog.text and "cannot start" not in caplog.text


async def test_a_load_error_that_is_not_a_model_load_error_is_logged_with_its_detail(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(config: Config, spec: str, name: str) -> object:
        raise KeyError("lm_head.weight")  # a bug or a checkpoint nobody foresaw

    monkeypatch.setattr("server.engine.load.load_engine", broken)
    assert await _serve(test_config(model_dir)) == 1
    (record,) = [r for r in caplog.records if r.getMessage().startswith("cannot start")]
    assert record.getMessage() == "cannot start: failed to load the model"
    assert record.exc_info is not None and "lm_head.weight" in caplog.text  # the detail, for whoever runs it


async def test_a_hub_id_in_the_local_cache_is_served_offline(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag_reranker: Any
) -> None:
    import huggingface_hub.constants

    from reranker_proto import reranker_pb2 as pb
    from reranker_proto import reranker_pb2_grpc as pb_grpc
    from server.engine.model import resolve_model_path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-reranker"  # the Hugging Face cache's own layout
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("test-org/tiny-reranker") == str(repo / "snapshots" / commit)  # offline, no probe
    srv = RerankServer(test_config("test-org/tiny-reranker"))  # type: ignore[arg-type]
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            candidates = ["hi", "The giant panda is a bear species endemic to China."]
            resp = await pb_grpc.RerankerStub(ch).Rerank(pb.RerankRequest(query="panda?", candidates=candidates))
        assert resp.model == "tiny-reranker"
        expected = flag_reranker.compute_score([["panda?", c] for c in candidates])
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
    finally:
        await srv.stop(0)
