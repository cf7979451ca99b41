"""The Rerank and GetModelInfo RPCs end to end: real server, real channel, real FlagEmbedding path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import __version__
from server.app import RerankServer
from tests.conftest import FP32_REORDERED, test_config

QUERY = "what is panda?"
CANDIDATES = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
    "is a bear species endemic to China.",
    "The quick brown fox jumps over the lazy dog.",
    "今天天气怎么样",
    "gRPC is a remote procedure call framework; protobuf describes its messages.",
    "Numbers like 3.14159 and 2026 appear in text too. " * 20,
]


@pytest.mark.parametrize("normalize", [False, True])
async def test_candidates_scores_equal_flag_reranker(
    stub: pb_grpc.RerankerStub, flag_reranker: Any, normalize: bool
) -> None:
    resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, normalize=normalize))
    expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES], normalize=normalize)
    assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
    assert len(set(resp.scores)) == len(CANDIDATES)  # the tiny model tells the candidates apart
    if normalize:
        assert all(0.0 <= s <= 1.0 for s in resp.scores)
    else:
        assert any(s < 0.0 for s in resp.scores)  # raw logits, not probabilities


@pytest.mark.parametrize("normalize", [False, True])
async def test_pairs_scores_equal_flag_reranker(
    stub: pb_grpc.RerankerStub, flag_reranker: Any, normalize: bool
) -> None:
    pairs = [(f"query {i % 3}", c) for i, c in enumerate(CANDIDATES)]
    resp = await stub.Rerank(
        pb.RerankRequest(pairs=[pb.Pair(query=q, passage=p) for q, p in pairs], normalize=normalize)
    )
    expected = flag_reranker.compute_score([list(p) for p in pairs], normalize=normalize)
    assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)


async def test_max_length_truncates_like_flag_reranker(stub: pb_grpc.RerankerStub, flag_reranker: Any) -> None:
    resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, max_length=16))
    expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES], max_length=16)
    assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
    assert resp.usage.tokens <= 16 * len(CANDIDATES)


async def test_results_ranked_best_first_and_cut_to_top_n(stub: pb_grpc.RerankerStub) -> None:
    full = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES))
    ranked = sorted(range(len(CANDIDATES)), key=lambda i: -full.scores[i])
    assert [r.index for r in full.results] == ranked
    assert [r.score for r in full.results] == [full.scores[i] for i in ranked]
    assert all(r.document == "" for r in full.results)

    top = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, top_n=2, return_documents=True))
    assert [r.index for r in top.results] == ranked[:2]
    assert [r.document for r in top.results] == [CANDIDATES[i] for i in ranked[:2]]
    assert len(top.scores) == len(CANDIDATES)  # input-order scores are never cut


async def test_response_carries_model_and_usage(stub: pb_grpc.RerankerStub, model_dir: Any) -> None:
    resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES[:3]))
    assert resp.model == model_dir.name  # a bare path is named after its last part
    assert resp.usage.pairs == 3
    assert resp.usage.tokens > 3
    assert resp.usage.inference_ms > 0


async def test_queue_ms_counts_the_wait_for_a_batch_to_fill(model_dir: Path, engine: Any) -> None:
    """A request smaller than a batch waits --max-wait-ms for company before its forward pass: a lower bound."""
    srv = RerankServer(test_config(model_dir, max_wait_ms=50.0), engine=engine)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            resp = await pb_grpc.RerankerStub(ch).Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES[:3]))
        assert resp.usage.queue_ms >= 50.0
        assert resp.usage.inference_ms > 0
    finally:
        await srv.stop(0)


async def test_model_info(stub: pb_grpc.RerankerStub, model_dir: Any) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model, info.device, info.dtype) == (model_dir.name, "cpu", "float32")
    assert info.max_length == 512
    assert info.limits.max_candidates == 1000
    assert info.limits.max_text_chars == 20000
    assert info.version == __version__


LONG = "x" * 20001


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"query": "", "candidates": ["a"]}, "query is empty"),
        ({"query": "   ", "candidates": ["a"]}, "query is empty"),
        ({"query": "q"}, "no candidates"),
        ({}, "no candidates"),
        ({"query": "q", "candidates": ["a", ""]}, "candidates[1] is empty"),
        ({"query": "q", "candidates": ["a"], "pairs": [pb.Pair(query="q", passage="a")]}, "not both"),
        ({"candidates": ["a"], "pairs": [pb.Pair(query="q", passage="a")]}, "not both"),
        ({"pairs": [pb.Pair(query="", passage="a")]}, "pairs[0].query is empty"),
        ({"pairs": [pb.Pair(query="q", passage="")]}, "pairs[0].passage is empty"),
        ({"query": "q", "candidates": ["a"] * 1001}, "the limit is 1000"),
        ({"query": "q", "candidates": ["a", LONG]}, "candidates[1] has 20001 characters; the limit is 20000"),
        ({"query": LONG, "candidates": ["a"]}, "query has 20001 characters; the limit is 20000"),
        ({"query": "q", "candidates": ["a"], "max_length": 513}, "max_length 513 is above the server's limit of 512"),
    ],
)
async def test_invalid_requests_are_refused_with_the_rule(
    stub: pb_grpc.RerankerStub, request_kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(pb.RerankRequest(**request_kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    # ...and the server goes on serving.
    ok = await stub.Rerank(pb.RerankRequest(query="q", candidates=["a"]))
    assert len(ok.scores) == 1


async def test_unexpected_error_is_internal_without_traceback(
    server: Any, stub: pb_grpc.RerankerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(pairs: Any, max_length: Any = None) -> Any:
        raise KeyError("secret detail")

    monkeypatch.setattr(server.service.scoring.engine, "encode", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(pb.RerankRequest(query="q", candidates=["a"]))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in err.value.details() and "secret detail" not in err.value.details()


async def test_a_bert_cross_encoder_scores_equal_its_flag_reranker(tmp_path: Any) -> None:
    """A BERT-style model (token type ids, WordPiece, lower-casing) served end to end, not only XLM-R ones."""
    from server.app import RerankServer
    from tests.conftest import test_config
    from tools.make_model import build_bert_model

    srv = RerankServer(test_config(build_bert_model(tmp_path / "bert")))
    await srv.start()
    try:
        flag = srv.service.models[srv.config.default_model].engine.flag
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            resp = await pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES))
        expected = flag.compute_score([[QUERY, c] for c in CANDIDATES])
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
        assert len(set(resp.scores)) == len(CANDIDATES)
    finally:
        await srv.stop(0)


async def test_a_request_of_several_tokenizing_slices_equals_flag_reranker(
    stub: pb_grpc.RerankerStub, flag_reranker: Any
) -> None:
    """Over TOKENIZE_SLICE pairs: the slices are tokenized apart and queue one by one; every score lands in place."""
    from server.service import TOKENIZE_SLICE

    words = " ".join(CANDIDATES).split()
    candidates = [" ".join(words[i % 40 : i % 40 + 3 + i % 17]) for i in range(2 * TOKENIZE_SLICE + 44)]
    resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=candidates))
    expected = flag_reranker.compute_score([[QUERY, c] for c in candidates])
    # Batched apart from compute_score's own batches of 128 (and how depends on when each slice queues), padding moves
    # the tiny model's scores by float rounding: up to 2.3e-5 seen.
    assert list(resp.scores) == pytest.approx(expected, abs=1e-4)
    assert len(set(resp.scores)) > len(candidates) // 2  # distinct enough that a misplaced score would show
    assert resp.usage.pairs == len(candidates)
