"""AsyncRerankerClient against real servers: every method, and a typed error for each status."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import (
    AsyncRerankerClient,
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    RerankerError,
    Retry,
    UnavailableError,
)
from clients._common import join_targets, service_config
from server.app import RerankServer
from tests.conftest import FP32_REORDERED, test_config
from tests.ops_helpers import until

QUERY = "what is panda?"
CANDIDATES = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "The quick brown fox jumps over the lazy dog.",
    "今天天气怎么样",
]


@pytest.fixture
async def client(server: RerankServer) -> AsyncIterator[AsyncRerankerClient]:
    async with AsyncRerankerClient(f"127.0.0.1:{server.port}", timeout=20) as c:
        yield c


@pytest.fixture
async def slow_server(model_dir: Path, engine: Any) -> AsyncIterator[RerankServer]:
    """A batch goes only when full (5 pairs; it would wait ten minutes for company), and the queue holds 5 pairs."""
    config = test_config(model_dir, max_wait_ms=600_000.0, batch_size=5, max_candidates=4, max_queue_pairs=5)
    srv = RerankServer(config, engine=engine)
    await srv.start()
    yield srv
    await srv.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("normalize", [False, True])
async def test_rerank_ranks_and_scores_like_flag_reranker(
    client: AsyncRerankerClient, server: RerankServer, flag_reranker: Any, normalize: bool
) -> None:
    out = await client.rerank(QUERY, CANDIDATES, normalize=normalize)
    expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES], normalize=normalize)
    assert out.scores == pytest.approx(expected, **FP32_REORDERED)
    assert [r.index for r in out.results] == sorted(range(len(CANDIDATES)), key=lambda i: -expected[i])
    assert [r.score for r in out.results] == sorted(out.scores, reverse=True)
    assert all(r.document is None for r in out.results)
    assert out.usage.pairs == len(CANDIDATES) and out.usage.tokens > 0
    assert out.model == server.config.default_model
    if normalize:
        assert all(0.0 <= s <= 1.0 for s in out.scores)


async def test_rerank_top_n_and_documents(client: AsyncRerankerClient) -> None:
    out = await client.rerank(QUERY, CANDIDATES, top_n=2, return_documents=True, max_length=16)
    assert len(out.results) == 2 and len(out.scores) == len(CANDIDATES)
    assert [r.document for r in out.results] == [CANDIDATES[r.index] for r in out.results]


async def test_score_pairs_in_input_order(client: AsyncRerankerClient, flag_reranker: Any) -> None:
    pairs = [(QUERY, "hi"), ("什么是函数计算", "函数计算是阿里云Serverless计算服务"), (QUERY, CANDIDATES[1])]
    scores = await client.score_pairs(pairs, normalize=True)
    assert scores == pytest.approx(
        flag_reranker.compute_score([list(p) for p in pairs], normalize=True), **FP32_REORDERED
    )


async def test_model_info_and_health(client: AsyncRerankerClient, server: RerankServer) -> None:
    info = await client.model_info()
    assert info.model == server.config.default_model and info.device == "cpu" and info.dtype == "float32"
    assert info.max_candidates == server.config.max_candidates and info.max_text_chars == server.config.max_text_chars
    assert info.max_length == server.config.max_length and info.version
    assert await client.health() == "SERVING"
    assert await client.health("") == "SERVING"
    with pytest.raises(RerankerError) as err:
        await client.health("no.such.Service")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_wait_until_ready_waits_for_the_model(model_dir: Path, engine: Any) -> None:
    srv = RerankServer(test_config(model_dir), engine=engine)
    port = await srv.bind()  # listening, NOT_SERVING until loaded
    try:
        async with AsyncRerankerClient(f"127.0.0.1:{port}") as client:
            assert await client.health() == "NOT_SERVING"
            with pytest.raises(UnavailableError, match="not SERVING after .* NOT_SERVING"):
                await client.wait_until_ready(timeout=0.5)
            waiting = asyncio.ensure_future(client.wait_until_ready(timeout=30))
            await srv.load()
            await waiting
            assert (await client.rerank(QUERY, ["hi"])).scores
    finally:
        await srv.stop(0)


async def test_invalid_argument_from_server_validation(client: AsyncRerankerClient) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await client.rerank(QUERY, ["hi", "  "])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == "candidates[1] is empty"
    with pytest.raises(InvalidRequestError, match="limit of 512 tokens"):
        await client.rerank(QUERY, ["hi"], max_length=100_000)
    with pytest.raises(InvalidRequestError, match="limit is 1000 per request"):
        await client.score_pairs([(QUERY, "hi")] * 1001)


async def test_invalid_arguments_caught_before_sending(client: AsyncRerankerClient) -> None:
    with pytest.raises(InvalidRequestError, match="list of strings, not a single string"):
        await client.rerank(QUERY, "hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="top_n must be a positive integer"):
        await client.rerank(QUERY, ["hi"], top_n=0)
    with pytest.raises(InvalidRequestError, match=r"pairs\[1\] must be a \(query, passage\) pair"):
        await client.score_pairs([(QUERY, "hi"), (QUERY,)])  # type: ignore[list-item]


async def test_resource_exhausted_when_the_queue_is_full(slow_server: RerankServer) -> None:
    async with AsyncRerankerClient(f"127.0.0.1:{slow_server.port}") as client:
        first = asyncio.ensure_future(client.rerank(QUERY, CANDIDATES))  # 4 of the 5 places, waiting for company
        batcher = slow_server.batcher()
        assert batcher is not None
        await until(lambda: batcher.queued_pairs == len(CANDIDATES))
        with pytest.raises(OverloadedError) as err:
            await client.rerank(QUERY, ["hi", "hi"])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4 pairs queued, 2 more would exceed the queue limit of 5" in err.value.message
        filler = await client.rerank(QUERY, ["hi"])  # the fifth pair fills the batch: both go
        assert len(filler.scores) == 1
        assert len((await first).scores) == len(CANDIDATES)  # not retried, and the queued request still finishes


async def test_deadline_exceeded_and_the_server_keeps_serving(slow_server: RerankServer) -> None:
    async with AsyncRerankerClient(f"127.0.0.1:{slow_server.port}") as client:
        with pytest.raises(DeadlineExceededError) as err:
            await client.rerank(QUERY, ["hi"], timeout=0.2)  # its batch never fills
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert isinstance(err.value, TimeoutError)
        batcher = slow_server.batcher()
        assert batcher is not None
        await until(lambda: batcher.queued_pairs == 0)  # the server's own deadline (a moment later) dropped it
        full = await asyncio.gather(client.rerank(QUERY, CANDIDATES), client.rerank(QUERY, ["hi"]))  # 5 pairs
        assert [len(r.scores) for r in full] == [len(CANDIDATES), 1]
        assert await client.health() == "SERVING"
    assert batcher.stats.dropped_pairs == 1  # skipped, not scored


async def test_unavailable_with_nothing_listening() -> None:
    retry = Retry(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with AsyncRerankerClient(f"127.0.0.1:{free_port()}", retry=retry, timeout=20) as client:
        with pytest.raises(UnavailableError) as err:
            await client.rerank(QUERY, ["hi"])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(UnavailableError, match="not SERVING after"):
            await client.wait_until_ready(timeout=0.3)


def test_targets_and_service_config() -> None:
    assert join_targets("dns:///reranker-headless:50051") == "dns:///reranker-headless:50051"
    assert join_targets(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert join_targets(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="dns:///name:port"):
        join_targets(["reranker-0:50051", "reranker-1:50051"])
    assert '"round_robin"' in service_config(Retry()) and '"UNAVAILABLE"' in service_config(Retry())
    assert "retryPolicy" not in service_config(Retry(max_attempts=1))
    with pytest.raises(ValueError, match="1..5"):
        Retry(max_attempts=6)
