"""Long passages: long_documents=CHUNK against FlagReranker.compute_score, window limits, TRUNCATE_LEFT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.chunking import Splitter
from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import SENTENCES

QUERY = "what is panda?"
SHORT = ["hi", SENTENCES[2], "今天天气怎么样"]
# Numbered, so that every window's text is found once in its passage.
NUMBERED = [
    " ".join(f"({i}) {s}" for i, s in enumerate(SENTENCES * 8)),
    " ".join(f"{s} [{i}]" for i, s in enumerate(SENTENCES[::-1] * 6)),
]
LONG = [NUMBERED[0], "函数计算是阿里云Serverless计算服务" * 80, NUMBERED[1]]
CHUNK = pb.LONG_DOCUMENTS_CHUNK


def one_by_one(flag_reranker: Any, query: str, passages: list[str], max_length: int = 512) -> list[float]:
    return [flag_reranker.compute_score([[query, p]], max_length=max_length)[0] for p in passages]


@pytest.mark.parametrize("normalize", [False, True])
async def test_chunk_equals_truncate_exactly_when_every_passage_fits(
    stub: pb_grpc.RerankerStub, normalize: bool
) -> None:
    truncated = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=SHORT, normalize=normalize))
    chunked = await stub.Rerank(
        pb.RerankRequest(query=QUERY, candidates=SHORT, normalize=normalize, long_documents=CHUNK)
    )
    assert list(chunked.scores) == list(truncated.scores)
    assert chunked.usage.windows == truncated.usage.windows == chunked.usage.pairs == len(SHORT)


@pytest.mark.parametrize("max_length", [512, 128])
async def test_long_passage_scores_as_its_best_window(
    stub: pb_grpc.RerankerStub, engine: Any, flag_reranker: Any, max_length: int
) -> None:
    docs = [*SHORT, *LONG]
    req = pb.RerankRequest(query=QUERY, candidates=docs, max_length=max_length)
    truncated = await stub.Rerank(req)
    req.long_documents = CHUNK
    chunked = await stub.Rerank(req)
    splitter = Splitter(engine.flag, max_length)
    windows = [splitter.split(QUERY, d) for d in docs]
    assert [len(w) for w in windows[: len(SHORT)]] == [1] * len(SHORT)
    assert all(len(w) > 1 for w in windows[len(SHORT) :])
    assert chunked.usage.windows == sum(len(w) for w in windows) and chunked.usage.pairs == len(docs)
    for i, passage_windows in enumerate(windows):
        best = max(one_by_one(flag_reranker, QUERY, passage_windows, max_length))
        assert chunked.scores[i] == pytest.approx(best, **FP32_REORDERED)  # padding in shared batches moves fp32 ~1e-5
        assert chunked.scores[i] >= truncated.scores[i] - 1e-4


def test_windows_fit_overlap_and_cover_the_passage(engine: Any) -> None:
    for max_length in (512, 64, 40):
        splitter = Splitter(engine.flag, max_length)
        for doc in NUMBERED:
            windows = splitter.split(QUERY, doc)
            assert windows[0] == doc  # scored truncated to its head, as long_documents=TRUNCATE would
            pairs = [(QUERY, w) for w in windows[1:]]
            fitted, whole = engine.encode(pairs, max_length), engine.encode(pairs, 4 * max_length)
            assert [len(e) for e in fitted] == [len(e) for e in whole]  # nothing was cut off
            assert max(len(e) for e in fitted) <= max_length
            starts: list[int] = []
            for w in windows[1:]:  # each window is found after the previous one's start
                starts.append(doc.index(w, starts[-1] + 1 if starts else 1))
            assert 0 < starts[0] < len(windows[1]) and doc.endswith(windows[-1].rstrip())
            for s, w, nxt in zip(starts, windows[1:], starts[1:], strict=False):
                assert s < nxt < s + len(w)  # the next window starts inside this one


async def test_truncate_left_keeps_the_end(stub: pb_grpc.RerankerStub, engine: Any, flag_reranker: Any) -> None:
    docs = [SHORT[1], LONG[0]]
    resp = await stub.Rerank(
        pb.RerankRequest(query=QUERY, candidates=docs, long_documents=pb.LONG_DOCUMENTS_TRUNCATE_LEFT)
    )
    (last,) = Splitter(engine.flag, 512).split(QUERY, LONG[0], keep_end_only=True)
    assert LONG[0].rstrip().endswith(last.rstrip())
    want = one_by_one(flag_reranker, QUERY, [SHORT[1], last])
    assert list(resp.scores) == pytest.approx(want, **FP32_REORDERED)
    assert resp.usage.windows == 2


async def test_pairs_are_chunked_with_their_own_query(
    stub: pb_grpc.RerankerStub, engine: Any, flag_reranker: Any
) -> None:
    pairs = [("what is panda?", LONG[0]), ("什么是函数计算", LONG[1])]
    req = pb.RerankRequest(pairs=[pb.Pair(query=q, passage=p) for q, p in pairs], long_documents=CHUNK)
    resp = await stub.Rerank(req)
    splitter = Splitter(engine.flag, 512)
    for i, (q, p) in enumerate(pairs):
        assert resp.scores[i] == pytest.approx(
            max(one_by_one(flag_reranker, q, splitter.split(q, p))), **FP32_REORDERED
        )


@pytest.fixture
async def small_limits(model_dir: Path, engine: Any) -> AsyncIterator[pb_grpc.RerankerStub]:
    srv = RerankServer(test_config(model_dir, max_windows_per_doc=8, max_windows_per_request=12), engine=engine)
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield pb_grpc.RerankerStub(channel)
    await srv.stop(0)


@pytest.mark.parametrize(
    ("request_fields", "problem"),
    [
        (
            {"candidates": [LONG[0]], "max_windows_per_doc": 2},
            "candidates[0] needs 8 windows to be scored whole; "
            "the limit is 2 windows per passage (max_windows_per_doc 2, max_chunks_per_doc over REST)",
        ),
        ({"candidates": [LONG[0] * 3]}, "the limit is 8 windows per passage (--max-windows-per-doc 8)"),
        ({"candidates": [LONG[0]] * 3}, "the limit is 12 windows per request (--max-windows-per-request 12)"),
        (
            {"candidates": ["a"], "max_windows_per_doc": 9},
            "max_windows_per_doc 9 (max_chunks_per_doc over REST) is above the server's limit of 8",
        ),
        ({"candidates": ["a"], "max_length": 16, "query": "q " * 50}, "max_length 16 leaves no room for a passage"),
    ],
)
async def test_window_limits_are_invalid_argument_naming_the_limit(
    small_limits: pb_grpc.RerankerStub, request_fields: dict[str, Any], problem: str
) -> None:
    req = pb.RerankRequest(**{"query": QUERY, "long_documents": CHUNK, **request_fields})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await small_limits.Rerank(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (err.value.details() or "")


async def test_max_windows_per_doc_needs_chunk(stub: pb_grpc.RerankerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=["a"], max_windows_per_doc=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "applies only with long_documents=LONG_DOCUMENTS_CHUNK" in (err.value.details() or "")


async def test_client_chunks_long_passages(server: Any, flag_reranker: Any) -> None:
    """The Python client's long_documents: "chunk" scores a long passage by its best window; usage counts windows."""
    from clients import AsyncRerankerClient, InvalidRequestError

    long = " ".join(SENTENCES) * 6
    async with AsyncRerankerClient(f"127.0.0.1:{server.port}") as client:
        cut = await client.rerank("what is panda?", [long, "hi"], max_length=64)
        chunked = await client.rerank("what is panda?", [long, "hi"], max_length=64, long_documents="chunk")
        assert chunked.usage.windows > chunked.usage.pairs == 2
        assert chunked.scores[0] >= cut.scores[0] and chunked.scores[1] == pytest.approx(
            cut.scores[1], **FP32_REORDERED
        )
        with pytest.raises(InvalidRequestError, match="long_documents"):
            await client.rerank("q", ["a"], long_documents="middle")
