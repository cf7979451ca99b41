"""Traces through the real bridge, server, tokenizing and batcher, recorded by the SDK into an in-memory exporter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import make_mocked_request
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clients import AsyncRerankerClient, RerankerClient
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge import BridgeConfig, create_app
from rest_bridge.config import load_bridge_config
from rest_bridge.tracing import trace_metadata
from server import tracing
from server.app import RerankServer
from server.config import load_config
from tests.conftest import test_config
from tests.server_thread import ServerThread

PROVIDER = TracerProvider()
EXPORTER = InMemorySpanExporter()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
CALLER = PROVIDER.get_tracer("test-caller")
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
RPC = "reranker.v1.Reranker/Rerank"
PASSAGES = ["hi", "The giant panda is a bear species endemic to China.", "今天天气怎么样"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for one test (server, bridge and workers of this process), off again after it."""
    EXPORTER.clear()
    tracing.enable(PROVIDER)
    yield EXPORTER
    tracing.disable()
    EXPORTER.clear()


async def finished(exporter: InMemorySpanExporter, *names: str, timeout_s: float = 10.0) -> list[ReadableSpan]:
    """The spans ended so far, once one of each name is among them (a span may end just after the answer is sent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = list(exporter.get_finished_spans())
        if {s.name for s in got} >= set(names) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


def named(got: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in got if s.name == name]


def children(got: list[ReadableSpan], parent: ReadableSpan) -> set[str]:
    return {s.name for s in got if s.parent is not None and s.parent.span_id == parent.context.span_id}


@pytest.fixture
async def traced_server(model_dir: Path, engine: Any, spans: InMemorySpanExporter) -> AsyncIterator[RerankServer]:
    # A long batch wait: concurrent requests surely share a forward pass.
    srv = RerankServer(test_config(model_dir, max_wait_ms=300.0), engine=engine)
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_one_rest_call_is_one_trace_from_the_caller_through_bridge_server_and_batch(
    traced_server: RerankServer, spans: InMemorySpanExporter, aiohttp_client: Any
) -> None:
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{traced_server.port}")))
    headers = {"traceparent": TRACEPARENT, "x-request-id": "rest-1"}
    resp = await bridge.post("/rerank", json={"query": "what is panda?", "texts": PASSAGES}, headers=headers)
    assert resp.status == 200, await resp.text()
    got = await finished(spans, "POST /rerank", RPC, "tokenize", "queue", "forward", "response")

    assert {s.context.trace_id for s in got} == {TRACE_ID}  # one trace, the caller's
    (http,) = named(got, "POST /rerank")
    assert http.kind == SpanKind.SERVER and http.parent is not None and http.parent.span_id == PARENT_ID
    assert http.attributes["http.response.status_code"] == 200 and http.attributes["http.route"] == "/rerank"
    assert http.attributes["reranker.request_id"] == "rest-1"
    (rpc,) = named(got, RPC)
    assert rpc.kind == SpanKind.SERVER and rpc.parent is not None and rpc.parent.span_id == http.context.span_id
    assert rpc.attributes["reranker.request_id"] == "rest-1" and rpc.attributes["rpc.grpc.status_code"] == 0
    assert rpc.attributes["reranker.pairs"] == 3 and rpc.attributes["reranker.tokens"] > 0
    assert children(got, rpc) == {"tokenize", "queue", "forward", "response"}
    (forward,) = named(got, "forward")
    assert forward.attributes["reranker.batch.pairs"] == 3 and forward.attributes["reranker.batch.request_pairs"] == 3
    assert forward.attributes["reranker.batch.tokens"] == rpc.attributes["reranker.tokens"]
    assert forward.attributes["reranker.model"] == traced_server.config.default_model
    assert forward.attributes["reranker.device"] == "cpu"
    (tokenize,) = named(got, "tokenize")
    assert tokenize.attributes["reranker.pairs"] == 3
    (queue,) = named(got, "queue")
    # In order, inside the RPC: tokenized, queued, scored, answered.
    assert rpc.start_time <= tokenize.start_time <= tokenize.end_time <= forward.start_time
    assert queue.end_time == forward.start_time and forward.end_time <= named(got, "response")[0].start_time
    assert http.start_time <= rpc.start_time and rpc.end_time <= http.end_time


async def test_a_bridge_call_without_traceparent_starts_a_trace_the_server_continues(
    traced_server: RerankServer, spans: InMemorySpanExporter, aiohttp_client: Any
) -> None:
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{traced_server.port}")))
    resp = await bridge.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert resp.status == 200
    got = await finished(spans, "POST /v1/rerank", RPC, "forward")
    (http,) = named(got, "POST /v1/rerank")
    assert http.parent is None and {s.context.trace_id for s in got} == {http.context.trace_id}
    assert named(got, RPC)[0].parent.span_id == http.context.span_id  # type: ignore[union-attr]


async def test_concurrent_requests_sharing_a_forward_pass_each_record_it(
    traced_server: RerankServer, spans: InMemorySpanExporter
) -> None:
    async with AsyncRerankerClient(f"127.0.0.1:{traced_server.port}") as client:
        await asyncio.gather(client.rerank("q one", PASSAGES[:2]), client.rerank("q two", PASSAGES))
    got = await finished(spans, RPC, "forward")
    forwards = named(got, "forward")
    assert len(forwards) == 2 and len({s.context.trace_id for s in forwards}) == 2  # one in each request's trace
    numbers = {s.attributes["reranker.batch.number"] for s in forwards}
    assert len(numbers) == 1 and {s.attributes["reranker.batch.pairs"] for s in forwards} == {5}
    assert sorted(s.attributes["reranker.batch.request_pairs"] for s in forwards) == [2, 3]
    assert forwards[0].start_time == forwards[1].start_time and forwards[0].end_time == forwards[1].end_time


async def test_the_async_client_continues_the_callers_trace(
    traced_server: RerankServer, spans: InMemorySpanExporter
) -> None:
    async with AsyncRerankerClient(f"127.0.0.1:{traced_server.port}") as client:
        with CALLER.start_as_current_span("caller") as caller:
            await client.rerank("what is panda?", PASSAGES)
            await client.model_info()
    got = await finished(spans, "caller", RPC, "reranker.v1.Reranker/GetModelInfo")
    for name in (RPC, "reranker.v1.Reranker/GetModelInfo"):
        (rpc,) = named(got, name)
        assert rpc.context.trace_id == caller.get_span_context().trace_id
        assert rpc.parent is not None and rpc.parent.span_id == caller.get_span_context().span_id


def test_the_blocking_client_continues_the_callers_trace(
    model_dir: Path, engine: Any, spans: InMemorySpanExporter
) -> None:
    live = ServerThread(test_config(model_dir), engine)
    try:
        with RerankerClient(f"127.0.0.1:{live.port}", timeout=20) as client:
            with CALLER.start_as_current_span("caller") as caller:
                client.rerank("what is panda?", PASSAGES)
            client.rerank("no caller span", PASSAGES)
    finally:
        live.stop()
    rpcs = named(list(spans.get_finished_spans()), RPC)
    assert len(rpcs) == 2
    assert rpcs[0].parent is not None and rpcs[0].parent.span_id == caller.get_span_context().span_id
    assert rpcs[1].parent is None and rpcs[1].context.trace_id != caller.get_span_context().trace_id


async def test_tokenizing_in_a_worker_process_is_a_span_of_its_own(
    model_dir: Path, engine: Any, spans: InMemorySpanExporter
) -> None:
    srv = RerankServer(test_config(model_dir, tokenize_workers=1), engine=engine)
    await srv.start()
    try:
        pids = srv.service.scoring.tokenizing.workers.pids  # type: ignore[union-attr]
        async with AsyncRerankerClient(f"127.0.0.1:{srv.port}") as client:
            await client.rerank("what is panda?", PASSAGES * 50)  # 150 pairs: two slices
    finally:
        await srv.stop(0)
    got = await finished(spans, RPC, "tokenizer worker")
    tokenizes, workers = named(got, "tokenize"), named(got, "tokenizer worker")
    assert sorted(s.attributes["reranker.pairs"] for s in tokenizes) == [22, 128]
    assert len(workers) == 2 and {s.attributes["reranker.worker.pid"] for s in workers} == set(pids)
    for worker in workers:
        (parent,) = [s for s in tokenizes if s.context.span_id == worker.parent.span_id]  # type: ignore[union-attr]
        assert parent.start_time <= worker.start_time <= worker.end_time <= parent.end_time


async def test_each_stream_request_has_its_span_with_its_id_and_outcome(
    traced_server: RerankServer, spans: InMemorySpanExporter
) -> None:
    requests = [
        pb.RerankRequest(request_id="a", query="q", candidates=PASSAGES),
        pb.RerankRequest(request_id="b", query="q", candidates=[]),  # INVALID_ARGUMENT, as its own answer
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server.port}") as ch:
        answers = [a async for a in pb_grpc.RerankerStub(ch).RerankStream(iter(requests))]
    assert {a.request_id for a in answers} == {"a", "b"}
    got = await finished(spans, "reranker.v1.Reranker/RerankStream", "forward")
    (stream,) = named(got, "reranker.v1.Reranker/RerankStream")
    reranks = {s.attributes["reranker.request_id"]: s for s in named(got, "rerank")}
    assert set(reranks) == {"a", "b"}
    for s in reranks.values():
        assert s.parent is not None and s.parent.span_id == stream.context.span_id
    assert children(got, reranks["a"]) == {"tokenize", "queue", "forward", "response"}
    assert reranks["b"].attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reranks["b"].status.status_code == StatusCode.UNSET  # the caller's error, not the server's


async def test_a_refused_call_is_recorded_as_refused_and_no_server_error(
    model_dir: Path, engine: Any, spans: InMemorySpanExporter
) -> None:
    srv = RerankServer(test_config(model_dir, max_candidates=2), engine=engine)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.RerankerStub(ch).Rerank(pb.RerankRequest(query="q", candidates=PASSAGES))
    finally:
        await srv.stop(0)
    (rpc,) = named(await finished(spans, RPC), RPC)
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rpc.status.status_code == StatusCode.UNSET and "forward" not in {s.name for s in spans.get_finished_spans()}


async def test_off_records_nothing(server: RerankServer, aiohttp_client: Any) -> None:
    EXPORTER.clear()
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}")))
    resp = await bridge.post("/rerank", json={"query": "q", "texts": PASSAGES}, headers={"traceparent": TRACEPARENT})
    assert resp.status == 200 and not tracing.on()
    assert EXPORTER.get_finished_spans() == ()


def test_a_bridge_that_does_not_trace_passes_the_callers_context_on_as_it_came() -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=1", "x-other": "y"}
    assert trace_metadata(make_mocked_request("POST", "/rerank", headers=headers)) == [
        ("traceparent", TRACEPARENT),
        ("tracestate", "vendor=1"),
    ]
    bad = make_mocked_request("POST", "/rerank", headers={"traceparent": "00-\u00e9"})
    assert trace_metadata(bad) == []


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": " "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SERVICE_NAME": "reranker"}, False),
    ],
)
def test_the_configs_record_whether_otel_traces_exporter_asks_for_traces(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on
    assert load_config(["--model", "m"], env=env).tracing is on
    assert load_bridge_config([], env=env).tracing is on


def test_a_slice_that_fails_on_its_thread_leaves_an_error_span(spans: InMemorySpanExporter) -> None:
    def die(pairs: list[tuple[str, str]]) -> list[Any]:
        tracing.worker_taken(4242)
        raise RuntimeError("the tokenizer worker (pid 4242) died while tokenizing this request")

    with CALLER.start_as_current_span("caller") as caller:
        encode = tracing.on_thread("tokenize", die, {"reranker.pairs": 1})
    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="died"):
        pool.submit(encode, [("q", "p")]).result()
    (tokenize,) = named(list(spans.get_finished_spans()), "tokenize")
    assert tokenize.parent is not None and tokenize.parent.span_id == caller.get_span_context().span_id
    assert tokenize.status.status_code == StatusCode.ERROR and "died" in (tokenize.status.description or "")
    (worker,) = named(list(spans.get_finished_spans()), "tokenizer worker")
    assert worker.attributes["reranker.worker.pid"] == 4242


async def test_cutting_long_passages_into_windows_is_a_span_before_tokenizing(
    traced_server: RerankServer, spans: InMemorySpanExporter
) -> None:
    async with AsyncRerankerClient(f"127.0.0.1:{traced_server.port}") as client:
        await client.rerank("what is panda?", [" ".join(PASSAGES * 200)], long_documents="chunk")
    got = await finished(spans, RPC, "split", "forward")
    (rpc,) = named(got, RPC)
    (split,) = named(got, "split")
    assert split.parent is not None and split.parent.span_id == rpc.context.span_id
    assert rpc.attributes["reranker.windows"] > rpc.attributes["reranker.pairs"] == 1
    assert split.end_time <= min(s.start_time for s in named(got, "tokenize"))
