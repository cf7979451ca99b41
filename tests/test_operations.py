"""Metrics, request ids and access logs, message-size limit, deadlines and the concurrent-RPC cap."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import __version__
from server.app import RerankServer, max_receive_bytes
from server.config import Config
from server.logs import JsonFormatter, TextFormatter
from tests.conftest import test_config
from tests.ops_helpers import GatedEngine, free_port, sample, scrape, until

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda is a bear species endemic to China."]
RERANK = pb.RerankRequest(query=QUERY, candidates=CANDIDATES)


async def _serve(config: Config, engine: Any) -> RerankServer:
    srv = RerankServer(config, engine=engine)
    await srv.start()
    return srv


@pytest.fixture
async def gated(model_dir: Path, engine: Any) -> AsyncIterator[tuple[RerankServer, GatedEngine]]:
    gate = GatedEngine(engine)
    srv = await _serve(test_config(model_dir, max_concurrent_rpcs=2), gate)
    yield srv, gate
    gate.gate.set()
    await srv.stop(0)


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """Everything logged at INFO and above while the test runs, one JSON object per line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield out
    root.removeHandler(handler)
    root.setLevel(old_level)


def _code(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return err.value.code()


async def test_metrics_are_served_on_their_own_port(model_dir: Path, engine: Any) -> None:
    srv = await _serve(test_config(model_dir, metrics_port=free_port()), engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            for _ in range(3):
                await stub.Rerank(RERANK)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Rerank(pb.RerankRequest(query=QUERY))
            assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
            await stub.GetModelInfo(pb.GetModelInfoRequest())
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        m = await asyncio.to_thread(scrape, srv.metrics_port)
    finally:
        await srv.stop(0)
    assert sample(m, "reranker_requests_total", method="Rerank", code="OK") == 3
    assert sample(m, "reranker_requests_total", method="Rerank", code="INVALID_ARGUMENT") == 1
    assert sample(m, "reranker_requests_total", method="GetModelInfo", code="OK") == 1
    assert not any(labels and dict(labels).get("method") == "Check" for _, labels in m)  # probes are not counted
    assert sample(m, "reranker_request_seconds_count", method="Rerank") == 4
    assert sample(m, "reranker_queue_seconds_count") == 3
    assert sample(m, "reranker_inference_seconds_count") == 3
    assert sample(m, "reranker_batch_size_sum") == 3 * len(CANDIDATES)  # every pair in exactly one batch
    assert sample(m, "reranker_batch_tokens_count") == sample(m, "reranker_batch_size_count") >= 1
    assert sample(m, "reranker_batch_tokens_sum") > 0
    assert sample(m, "reranker_queue_pairs") == 0
    assert sample(m, "reranker_requests_in_flight") == 0
    name = model_dir.name
    info = {"model": name, "models": name, "device": "cpu", "dtype": "float32", "version": __version__}
    assert sample(m, "reranker_model_info", **info) == 1
    assert sample(m, "process_resident_memory_bytes") > 0


async def test_two_servers_in_one_process_keep_their_own_counts(model_dir: Path, engine: Any) -> None:
    a = await _serve(test_config(model_dir, metrics_port=free_port()), engine)
    b = await _serve(test_config(model_dir, metrics_port=free_port()), engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ch:
            await pb_grpc.RerankerStub(ch).Rerank(RERANK)
        ma, mb = await asyncio.to_thread(scrape, a.metrics_port), await asyncio.to_thread(scrape, b.metrics_port)
    finally:
        await a.stop(0)
        await b.stop(0)
    assert sample(ma, "reranker_requests_total", method="Rerank", code="OK") == 1
    assert sample(mb, "reranker_requests_total", method="Rerank", code="OK") == 0


async def test_request_id_is_echoed_or_generated_and_logged(
    stub: pb_grpc.RerankerStub, access_lines: io.StringIO
) -> None:
    call = stub.Rerank(RERANK, metadata=(("x-request-id", "req-42"),))
    answers = [await call]
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())
    call = stub.Rerank(RERANK)
    answers.append(await call)
    generated = dict(tuple(await call.trailing_metadata()))["x-request-id"]
    assert len(generated) == 32 and generated != "req-42"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # errors carry it too
        await stub.Rerank(pb.RerankRequest(query=QUERY), metadata=(("x-request-id", "req-43"),))
    assert ("x-request-id", "req-43") in tuple(err.value.trailing_metadata())

    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    rpcs = [line for line in lines if line["msg"] == "rpc"]
    assert [(r["request_id"], r["method"], r["code"], r["pairs"]) for r in rpcs] == [
        ("req-42", "Rerank", "OK", 2),
        (generated, "Rerank", "OK", 2),
        ("req-43", "Rerank", "INVALID_ARGUMENT", 0),
    ]
    assert all(r["level"] == "INFO" and r["logger"] == "server.access" and r["ms"] > 0 for r in rpcs)
    for line, answer in zip(rpcs, answers, strict=False):  # the whole call, its queue wait and forward pass inside
        assert line["ms"] >= answer.usage.queue_ms + answer.usage.inference_ms - 0.01  # ms is rounded to 0.01
    assert "panda" not in access_lines.getvalue()  # no request text at INFO


async def test_request_ids_are_cut_refused_and_echoed(stub: pb_grpc.RerankerStub) -> None:
    call = stub.Rerank(RERANK, metadata=(("x-request-id", "m" * 200),))
    await call
    assert dict(tuple(await call.trailing_metadata()))["x-request-id"] == "m" * 128  # cut at 128 characters
    for rid in ("", "mine-1", "f" * 128):
        resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, request_id=rid))
        assert resp.request_id == rid
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, request_id="f" * 129))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "request_id has 129 characters; the limit is 128"


async def test_health_checks_are_logged_at_debug_only(
    channel: grpc.aio.Channel, access_lines: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="server.access"):
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert access_lines.getvalue() == ""
    assert [r.levelname for r in caplog.records if r.name == "server.access"] == ["DEBUG"]


def test_text_log_line_carries_the_fields() -> None:
    record = logging.LogRecord("server.access", logging.INFO, __file__, 1, "rpc", None, None)
    record.fields = {"method": "Rerank", "code": "OK", "ms": 1.25, "pairs": 2, "model": "a b"}
    line = TextFormatter().format(record)
    assert line.endswith('server.access: rpc method=Rerank code=OK ms=1.2 pairs=2 model="a b"')


def test_receive_limit_follows_the_request_limits() -> None:
    default = max_receive_bytes(Config())
    assert 1000 * 2 * 20000 * 4 < default < 200_000_000  # the largest valid request fits; 200 MB does not
    assert max_receive_bytes(Config(max_candidates=100_000, max_queue_pairs=100_000)) == 256 * 1024 * 1024


async def test_oversize_message_is_refused_and_the_server_keeps_serving(model_dir: Path, engine: Any) -> None:
    config = test_config(model_dir, max_candidates=10, max_text_chars=100)
    srv = await _serve(config, engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            # The largest valid request (4-byte characters in the pairs form) still fits.
            text = "\U0001f43c" * config.max_text_chars
            largest = pb.RerankRequest(pairs=[pb.Pair(query=text, passage=text)] * config.max_candidates)
            assert largest.ByteSize() <= max_receive_bytes(config)
            assert len((await stub.Rerank(largest)).scores) == config.max_candidates
            huge = pb.RerankRequest(query=QUERY, candidates=["x" * 1_000_000])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Rerank(huge)
            assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert str(max_receive_bytes(config)) in (err.value.details() or "")  # names the limit
            assert len((await stub.Rerank(RERANK)).scores) == 2
    finally:
        await srv.stop(0)


async def test_passed_deadline_drops_queued_pairs_and_the_server_keeps_serving(
    gated: tuple[RerankServer, GatedEngine],
) -> None:
    srv, gate = gated
    assert srv.batcher() is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        gate.gate.clear()
        first = asyncio.ensure_future(stub.Rerank(RERANK, timeout=60))
        await asyncio.to_thread(gate.entered.wait, 30)  # its batch holds the model
        late = asyncio.ensure_future(stub.Rerank(pb.RerankRequest(query=QUERY, candidates=["a", "b", "c"]), timeout=5))
        await until(lambda: srv.batcher() is not None and srv.batcher().queued_pairs == 3)  # queued behind it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await late
        assert _code(err) == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: srv.interceptor.in_flight == 1)  # the server gave up on it too
        gate.gate.set()
        assert len((await first).scores) == 2
        assert len((await stub.Rerank(RERANK)).scores) == 2
    assert srv.batcher().stats.dropped_pairs == 3  # never scored
    assert srv.batcher().stats.pairs == 4
    assert (
        srv.metrics.registry.get_sample_value(
            "reranker_requests_total", {"method": "Rerank", "code": "DEADLINE_EXCEEDED"}
        )
        == 1
    )


async def test_concurrent_rpc_cap_refuses_the_excess_but_not_health(gated: tuple[RerankServer, GatedEngine]) -> None:
    srv, gate = gated  # max_concurrent_rpcs=2
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        gate.gate.clear()
        held = [asyncio.ensure_future(stub.Rerank(RERANK, timeout=60)) for _ in range(2)]
        await until(lambda: srv.interceptor.in_flight == 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Rerank(RERANK)
        assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-rpcs" in (err.value.details() or "")
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes are never capped
        gate.gate.set()
        for call in held:
            assert len((await call).scores) == 2
        assert len((await stub.Rerank(RERANK)).scores) == 2  # the slot is free again


def test_a_busy_metrics_port_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--model", str(tmp_path)]
            + ["--metrics-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot start: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in proc.stderr
