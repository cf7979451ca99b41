"""RerankStream on the real server and model: answers as scored, per-request errors, cap, queue, key, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import (
    AsyncRerankerClient,
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    RerankerClient,
    Retry,
    StreamRequest,
    UnavailableError,
)
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from tests.conftest import FP32_REORDERED, test_config
from tests.load import PASSAGES, QUERIES, is_whole
from tests.ops_helpers import GatedEngine, until
from tests.server_thread import ServerThread
from tests.subprocess_server import ServerProcess

QUERY, CANDIDATES = "what is panda?", ["hi", "The giant panda is a bear species endemic to China."]


def stream_request(i: int) -> StreamRequest:
    return StreamRequest(
        query=QUERIES[i % len(QUERIES)],
        candidates=[PASSAGES[(i + k) % len(PASSAGES)] for k in range(1 + i % 3)],
        request_id=f"r{i}",
        top_n=(i % 3) or None,
        normalize=i % 2 == 0,
        return_documents=i % 5 == 0,
    )


class Feed:
    """Requests sent when the test says so; `close()` ends the sending side."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[StreamRequest | None] = asyncio.Queue()

    def send(self, *requests: StreamRequest) -> None:
        for r in requests:
            self._queue.put_nowait(r)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[StreamRequest]:
        while (r := await self._queue.get()) is not None:
            yield r


class Answers:
    """Reads a stream's answers in the background (an async generator starts its call only when read)."""

    def __init__(self, answers: AsyncIterator[Any]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read(answers))

    async def _read(self, answers: AsyncIterator[Any]) -> None:
        async for answer in answers:
            self._queue.put_nowait(answer)

    async def next(self) -> Any:
        """The next answer, or None once the stream has ended (`rest()` then raises its error, if any)."""
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter, self.task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if not self.task.done():
            raise TimeoutError("no answer within 30 s")
        return None

    async def rest(self) -> list[Any]:
        await self.task  # raises the stream's own error, if it ended with one
        return [self._queue.get_nowait() for _ in range(self._queue.qsize())]


async def _serve(model_dir: Path, engine: Any, **overrides: Any) -> RerankServer:
    srv = RerankServer(test_config(model_dir, **overrides), engine=engine)
    await srv.start()
    return srv


async def test_500_requests_match_unary_answers_and_a_bad_one_gets_its_own_error(server: RerankServer) -> None:
    requests = [stream_request(i) for i in range(500)]
    requests[250] = StreamRequest(query=QUERY, candidates=["ok", "  "], request_id="bad")
    async with AsyncRerankerClient(f"127.0.0.1:{server.port}") as client:
        answers = {a.request_id: a async for a in client.rerank_stream(requests)}
        limit = asyncio.Semaphore(32)

        async def unary(r: StreamRequest) -> Any:
            async with limit:
                return await client.rerank(
                    r.query, r.candidates, top_n=r.top_n, normalize=r.normalize, return_documents=r.return_documents
                )

        good = [r for r in requests if r.request_id != "bad"]
        expected = await asyncio.gather(*(unary(r) for r in good))
    assert len(answers) == 500
    bad = answers["bad"]
    assert isinstance(bad.error, InvalidRequestError) and "candidates[1] is empty" in bad.error.message
    for r, want in zip(good, expected, strict=True):
        got = answers[r.request_id].result
        assert got is not None, answers[r.request_id].error
        assert got.scores == pytest.approx(want.scores, **FP32_REORDERED)
        assert len(got.results) == len(want.results)
        assert [x.document for x in got.results if x.document] == [x.document for x in want.results if x.document]
    assert server.interceptor.in_flight == 0 and server.interceptor.admission.streams == 0


async def test_answers_come_as_scored_not_in_request_order(model_dir: Path, engine: Any) -> None:
    gate = GatedEngine(engine)
    srv = await _serve(model_dir, gate, batch_size=4, max_wait_ms=0.0)
    feed = Feed()
    try:
        async with AsyncRerankerClient(f"127.0.0.1:{srv.port}") as client:
            answers = Answers(client.rerank_stream(feed))
            gate.gate.clear()
            feed.send(StreamRequest(query=QUERY, candidates=["hi"] * 12, request_id="slow"))  # three batches of 4
            assert await asyncio.to_thread(gate.entered.wait, 30)  # slow's first batch holds the model
            feed.send(StreamRequest(query=QUERY, candidates=[CANDIDATES[1]], request_id="fast"))
            await until(lambda: (b := srv.batcher()) is not None and b.queued_pairs == 9)
            gate.gate.set()  # the longest pair leads the next batch: fast is scored before slow's last batch
            first, second = await answers.next(), await answers.next()
            feed.close()
            assert await answers.rest() == []
        assert (first.request_id, second.request_id) == ("fast", "slow") and first.ok and second.ok
    finally:
        gate.gate.set()
        await srv.stop(0)


async def test_cap_and_queue_limit_apply_per_request(model_dir: Path, engine: Any) -> None:
    gate = GatedEngine(engine)
    srv = await _serve(model_dir, gate, max_concurrent_rpcs=3, max_candidates=4, max_queue_pairs=6)
    feed = Feed()
    try:
        async with AsyncRerankerClient(f"127.0.0.1:{srv.port}") as client:
            answers = Answers(client.rerank_stream(feed))
            gate.gate.clear()
            feed.send(StreamRequest(query=QUERY, candidates=["a"] * 4, request_id="held1"))
            assert await asyncio.to_thread(gate.entered.wait, 30)  # held1's pairs are in the model
            feed.send(StreamRequest(query=QUERY, candidates=["b"] * 4, request_id="held2"))
            await until(lambda: (b := srv.batcher()) is not None and b.queued_pairs == 4)
            feed.send(StreamRequest(query=QUERY, candidates=["c"] * 4, request_id="over"))  # 4 + 4 > 6 queued
            refused = await answers.next()
            assert refused.request_id == "over" and isinstance(refused.error, OverloadedError)
            assert "queue limit of 6" in refused.error.message
            feed.send(StreamRequest(query=QUERY, candidates=["d"], request_id="held3"))
            await until(lambda: srv.interceptor.in_flight == 3)
            feed.send(StreamRequest(query=QUERY, candidates=["e"], request_id="capped"))
            capped = await answers.next()
            assert capped.request_id == "capped" and isinstance(capped.error, OverloadedError)
            assert "--max-concurrent-rpcs" in capped.error.message
            gate.gate.set()
            feed.close()
            rest = {a.request_id: a for a in await answers.rest()}
        assert set(rest) == {"held1", "held2", "held3"} and all(a.ok for a in rest.values())
    finally:
        gate.gate.set()
        await srv.stop(0)


async def test_api_key_applies_to_the_stream(model_dir: Path, engine: Any) -> None:
    srv = await _serve(model_dir, engine, api_key="k3y")
    try:
        target, request = f"127.0.0.1:{srv.port}", [StreamRequest(query=QUERY, candidates=CANDIDATES)]
        async with AsyncRerankerClient(target) as client:
            with pytest.raises(AuthenticationError):
                [a async for a in client.rerank_stream(request)]
        async with AsyncRerankerClient(target, api_key="k3y") as client:
            (answer,) = [a async for a in client.rerank_stream(request)]
        assert answer.ok and answer.request_id == "0"  # numbered by the client
    finally:
        await srv.stop(0)


async def test_deadline_and_cancel_drop_the_streams_queued_pairs(model_dir: Path, engine: Any) -> None:
    gate = GatedEngine(engine)
    srv = await _serve(model_dir, gate, max_wait_ms=0.0)
    batcher = srv.batcher()
    assert batcher is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            gate.gate.clear()
            first = stub.Rerank(pb.RerankRequest(query=QUERY, candidates=["x"]), timeout=60)
            await asyncio.to_thread(gate.entered.wait, 30)
            queued = [pb.RerankRequest(query=QUERY, candidates=["a", "b", "c"], request_id=f"q{i}") for i in range(2)]
            expiring = stub.RerankStream(iter(queued), timeout=1.0)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [a async for a in expiring]
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(lambda: batcher.queued_pairs == 0 and srv.interceptor.admission.streams == 0)
            cancelled = stub.RerankStream(iter(queued), timeout=60)
            await until(lambda: batcher.queued_pairs == 6)
            cancelled.cancel()
            await until(lambda: batcher.queued_pairs == 0 and srv.interceptor.in_flight == 1)
            gate.gate.set()
            assert len((await first).scores) == 1
        assert batcher.stats.dropped_pairs == 12 and batcher.stats.pairs == 1  # never scored
    finally:
        gate.gate.set()
        await srv.stop(0)


async def test_drain_answers_what_was_read_then_closes_with_unavailable(model_dir: Path, engine: Any) -> None:
    gate = GatedEngine(engine)
    srv = await _serve(model_dir, gate)
    feed = Feed()
    async with AsyncRerankerClient(f"127.0.0.1:{srv.port}") as client:
        answers = Answers(client.rerank_stream(feed))
        gate.gate.clear()
        feed.send(*(StreamRequest(query=QUERY, candidates=CANDIDATES, request_id=f"a{i}") for i in range(3)))
        await until(lambda: srv.interceptor.in_flight == 3)
        stopping = asyncio.ensure_future(srv.stop(10))
        await until(lambda: srv.interceptor.admission.draining)
        feed.send(StreamRequest(query=QUERY, candidates=CANDIDATES, request_id="late"))  # never read
        gate.gate.set()
        got = []
        while (answer := await answers.next()) is not None:
            got.append(answer)
        with pytest.raises(UnavailableError) as err:
            await answers.rest()
        await stopping
    accepted = sorted(a.request_id for a in got if a.ok)
    assert accepted == ["a0", "a1", "a2"]  # read before the drain: scored and answered
    # "late" was either never sent (the client saw the drain notice first) or answered as not accepted.
    refused = [a for a in got if not a.ok]
    assert len(refused) <= 1, got
    for a in refused:
        assert a.request_id == "late" and isinstance(a.error, UnavailableError), a.error
    assert "requests without an answer were not read" in err.value.message


def test_blocking_rerank_stream(model_dir: Path, engine: Any) -> None:
    thread = ServerThread(test_config(model_dir), engine)
    try:
        with RerankerClient(f"127.0.0.1:{thread.port}") as client:
            requests = [stream_request(i) for i in range(20)]
            answers = {a.request_id: a for a in client.rerank_stream(requests)}
            assert set(answers) == {r.request_id for r in requests} and all(a.ok for a in answers.values())
            unary = client.rerank(QUERY, CANDIDATES, return_documents=True)
            (one,) = client.rerank_stream([StreamRequest(query=QUERY, candidates=CANDIDATES, return_documents=True)])
            assert one.result is not None and one.result.scores == pytest.approx(unary.scores, **FP32_REORDERED)
            assert [r.document for r in one.result.results] == [r.document for r in unary.results]
            with pytest.raises(InvalidRequestError, match="candidates must be a list"):
                list(client.rerank_stream([StreamRequest(query=QUERY, candidates="not a list")]))
            with pytest.raises(DeadlineExceededError):
                list(client.rerank_stream(iter(_forever()), timeout=0.5))
    finally:
        thread.stop()


def _forever() -> Any:
    import time

    yield StreamRequest(query=QUERY, candidates=CANDIDATES)
    time.sleep(2)  # the stream's deadline passes while the caller has nothing more to send


async def test_sigterm_mid_stream_loses_no_accepted_request(model_dir: Path, tmp_path: Path) -> None:
    srv = ServerProcess(model_dir, tmp_path / "server.log", "--threads", "1", "--grace-s", "20")
    total, window, signal_after = 500, 32, 100
    feed, got = Feed(), []
    try:
        async with AsyncRerankerClient(srv.target, retry=Retry(max_attempts=1)) as client:
            answers = Answers(client.rerank_stream(feed))
            feed.send(*(stream_request(i) for i in range(window)))
            sent = window
            while (answer := await answers.next()) is not None:
                got.append(answer)
                if len(got) == signal_after:
                    srv.terminate()
                if sent < total:  # keep `window` requests outstanding; those sent after the drain are not read
                    feed.send(stream_request(sent))
                    sent += 1
            with pytest.raises(UnavailableError) as err:
                await answers.rest()
        exit_code = await asyncio.to_thread(srv.wait, 60)
    finally:
        srv.stop()
    log = srv.log()
    (line,) = [ln for ln in log.splitlines() if "method=RerankStream" in ln]
    counts = dict(kv.split("=") for kv in line.split() if kv.startswith(("requests=", "answered=", "errors=")))
    print(f"\nSIGTERM mid-stream: {sent} sent, {len(got)} answered, server: {counts}, end: {err.value.message!r}")
    accepted = [a for a in got if a.ok]
    refused = [a for a in got if not a.ok]  # sent before the client saw the drain notice: not accepted
    print(f"accepted {len(accepted)}, refused {len(refused)}")
    assert signal_after <= len(accepted) < total and len({a.request_id for a in got}) == len(got)
    assert int(counts["requests"]) == int(counts["answered"]) == len(got)  # every request read was answered
    assert int(counts["errors"]) == len(refused) and "code=UNAVAILABLE" in line
    assert all(isinstance(a.error, UnavailableError) and "not accepted" in a.error.message for a in refused)
    for a in accepted:  # every accepted request was answered in full
        i = int(a.request_id[1:])
        r = stream_request(i)
        req = pb.RerankRequest(query=r.query, candidates=r.candidates, top_n=r.top_n or 0)
        req.return_documents = r.return_documents
        assert a.result is not None and len(a.result.scores) == len(r.candidates)
        assert is_whole(req, _as_response(a.result))
    assert exit_code == 0 and "Traceback" not in log


def _as_response(result: Any) -> pb.RerankResponse:
    ranked = [pb.RankedCandidate(index=x.index, score=x.score, document=x.document or "") for x in result.results]
    usage = pb.Usage(pairs=result.usage.pairs)
    return pb.RerankResponse(scores=result.scores, results=ranked, usage=usage)
