"""Tracing as deployed: the OTEL_* variables alone turn it on in `python -m server` and `python -m rest_bridge`, the
SDK exports through OTLP (to a receiver on loopback) or to the console, and off, nothing imports OpenTelemetry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.otlp_sink import Sink, start_sink
from tests.subprocess_server import ROOT, ServerProcess, free_port, wait_for_line

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SAMPLED = f"00-{TRACE_ID:032x}-00f067aa0ba902b7-01"
UNSAMPLED_ID = 0x5BF92F3577B34DA6A3CE929D0E0E4737
UNSAMPLED = f"00-{UNSAMPLED_ID:032x}-00f067aa0ba902b7-00"
PASSAGES = ["hi", "The giant panda is a bear species endemic to China."]


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def sink() -> Iterator[tuple[int, Sink]]:
    server, port, received = start_sink()
    yield port, received
    server.stop(0)


def test_otel_variables_alone_send_the_servers_and_bridges_spans_over_otlp(
    model_dir: Path, tmp_path: Path, sink: tuple[int, Sink], monkeypatch: pytest.MonkeyPatch, no_otel_env: None
) -> None:
    port, received = sink
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "reranker-under-test")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")  # a caller's "not sampled" is respected
    rest_port = free_port()
    server = ServerProcess(model_dir, tmp_path / "server.log", "--rest-port", str(rest_port))
    try:
        url = f"http://127.0.0.1:{rest_port}/rerank"
        for traceparent in (SAMPLED, UNSAMPLED):
            body = {"query": "what is panda?", "texts": PASSAGES}
            resp = requests.post(url, json=body, headers={"traceparent": traceparent}, timeout=30)
            assert resp.status_code == 200, resp.text
        server.terminate()
        assert server.wait() == 0  # the SDK flushes its batch of spans at exit
    finally:
        server.stop()
    assert "tracing=True" in server.log()
    spans = [r for r in received.spans if r.span.trace_id == TRACE_ID.to_bytes(16, "big")]
    assert {r.service for r in received.spans} == {"reranker-under-test"}
    names = {r.span.name for r in spans}
    assert {"POST /rerank", "reranker.v1.Reranker/Rerank", "tokenize", "queue", "forward", "response"} <= names
    assert not [r for r in received.spans if r.span.trace_id == UNSAMPLED_ID.to_bytes(16, "big")]


def start_bridge(tmp_path: Path, exporter: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": exporter, "OTEL_SERVICE_NAME": "bridge-under-test"}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rest_bridge", "--host", "127.0.0.1", "--port", "0", "--grpc-target", "127.0.0.1:9"],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    return proc, out, err


def test_the_standalone_bridge_prints_its_spans_with_the_console_exporter(tmp_path: Path, no_otel_env: None) -> None:
    proc, out, err = start_bridge(tmp_path, "console")
    try:
        line = wait_for_line(proc, err, "REST bridge on", timeout=60)
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        resp = requests.get(f"http://127.0.0.1:{port}/health", headers={"traceparent": SAMPLED}, timeout=30)
        assert resp.status_code == 503  # no gRPC server behind it: still one span, an error
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    printed = out.read_text()
    start = printed.index("{")
    span = json.loads(printed[start : printed.index("\n}", start) + 2])
    assert span["name"] == "GET /health" and span["context"]["trace_id"] == f"0x{TRACE_ID:032x}"
    assert span["attributes"]["http.response.status_code"] == 503 and span["status"]["status_code"] == "ERROR"
    assert span["resource"]["attributes"]["service.name"] == "bridge-under-test"


def test_an_unknown_exporter_stops_the_start_with_the_sdks_reason(tmp_path: Path, no_otel_env: None) -> None:
    proc, _, err = start_bridge(tmp_path, "zipkinn")
    assert proc.wait(60) == 1
    assert "cannot configure OpenTelemetry from the OTEL_* variables" in err.read_text()
    assert "zipkinn" in err.read_text()


OFF_SCRIPT = """
import asyncio, importlib.util, sys
import aiohttp
from clients import AsyncRerankerClient
from rest_bridge import BridgeConfig, start_bridge
from server.app import RerankServer
from server.config import load_config

async def main(model):
    config = load_config(["--model", model, "--host", "127.0.0.1", "--port", "0", "--tokenize-workers", "1"])
    assert not config.tracing
    server = RerankServer(config)
    await server.start()
    runner, port = await start_bridge(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}", host="127.0.0.1", port=0))
    async with aiohttp.ClientSession() as session:
        body, headers = {"query": "q", "texts": ["a", "b"]}, {"traceparent": sys.argv[2]}
        async with session.post(f"http://127.0.0.1:{port}/rerank", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    async with AsyncRerankerClient(f"127.0.0.1:{server.port}") as client:
        await client.rerank("q", ["a", "b"])
    await runner.cleanup()
    await server.stop(0)
    print("imported:", sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    print("installed:", importlib.util.find_spec("opentelemetry.sdk") is not None)

asyncio.run(main(sys.argv[1]))
"""


def test_off_nothing_imports_opentelemetry(model_dir: Path, no_otel_env: None) -> None:
    """Off (no OTEL_TRACES_EXPORTER), a request through the bridge, a tokenizer worker, the batcher and the Python
    client leaves OpenTelemetry unimported, although it is installed and the caller sent a traceparent."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", OFF_SCRIPT, str(model_dir), SAMPLED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "imported: []" in done.stdout and "installed: True" in done.stdout
