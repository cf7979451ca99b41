"""POST /rerank's three dialects, Cohere /v1 and /v2, GET /info: real server, real bridge, the tiny model."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge import BridgeConfig, create_app
from server.app import RerankServer
from server.chunking import Splitter
from tests.conftest import FP32_REORDERED
from tests.test_bridge import PANDA, SEED_2_BODY, assert_close, reference
from tests.test_bridge_process import free_port
from tests.test_chunking import LONG

# Verbatim from TEI's README ("curl 127.0.0.1:8080/rerank -X POST -d '...'") and Infinity's rerank docstring.
TEI_EXAMPLE = '{"query":"What is Deep Learning?", "texts": ["Deep Learning is not...", "Deep learning is..."]}'
INFINITY_EXAMPLE = """{
            "model":"mixedbread-ai/mxbai-rerank-xsmall-v1",
            "query":"Where is Munich?",
            "documents":["Munich is in Germany.", "The sky is blue."]
        }"""


@pytest.fixture
async def bridge(server: RerankServer, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}")))


def ranked(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


async def test_legacy_2_answer_is_byte_identical(bridge: TestClient, stub: pb_grpc.RerankerStub) -> None:
    request = json.loads(SEED_2_BODY)
    resp = await bridge.post("/rerank", data=SEED_2_BODY.encode(), headers={"Content-Type": "application/json"})
    same = await stub.Rerank(pb.RerankRequest(query=request["query"], candidates=request["compare_to"], normalize=True))
    assert await resp.read() == json.dumps({"object": "list", "data": list(same.scores)}).encode()


async def test_tei_documented_example(bridge: TestClient, flag_reranker: Any) -> None:
    resp = await bridge.post("/rerank", data=TEI_EXAMPLE, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    got = await resp.json()
    body = json.loads(TEI_EXAMPLE)
    want = reference(flag_reranker, [[body["query"], t] for t in body["texts"]], normalize=True)
    assert [r["index"] for r in got] == ranked(want) and all(set(r) == {"index", "score"} for r in got)
    assert_close([r["score"] for r in got], [want[i] for i in ranked(want)])


async def test_tei_raw_scores_return_text_and_truncate(bridge: TestClient, engine: Any, flag_reranker: Any) -> None:
    texts = ["hi", PANDA, LONG[0]]
    body: dict[str, Any] = {"query": "what is panda?", "texts": texts, "raw_scores": True, "return_text": True}
    # TEI's auto-truncate (true by default since its PR #829): no `truncate` cuts the long text, as truncate: true.
    assert (
        await (await bridge.post("/rerank", json=body)).json()
        == await (await bridge.post("/rerank", json={**body, "truncate": True})).json()
    )
    chunked = await (await bridge.post("/rerank", json={**body, "max_chunks_per_doc": 64})).json()  # best window
    truncated = await (await bridge.post("/rerank", json={**body, "truncate": True})).json()
    left = await (await bridge.post("/rerank", json={**body, "truncate": True, "truncation_direction": "Left"})).json()
    want = reference(flag_reranker, [["what is panda?", t] for t in texts])
    assert [r["text"] for r in truncated] == [texts[r["index"]] for r in truncated]
    assert_close([r["score"] for r in truncated], [want[i] for i in ranked(want)])
    by_index = {r["index"]: r["score"] for r in chunked}
    windows = Splitter(engine.flag, 512).split("what is panda?", LONG[0])
    best = max(reference(flag_reranker, [["what is panda?", w] for w in windows]))
    assert by_index[2] == pytest.approx(best, **FP32_REORDERED) and by_index[2] >= want[2] - 1e-4
    (last,) = Splitter(engine.flag, 512).split("what is panda?", LONG[0], keep_end_only=True)
    assert {r["index"]: r["score"] for r in left}[2] == pytest.approx(
        reference(flag_reranker, [["what is panda?", last]])[0], **FP32_REORDERED
    )


async def test_infinity_documented_example(bridge: TestClient, flag_reranker: Any) -> None:
    resp = await bridge.post("/rerank", data=INFINITY_EXAMPLE, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    got = await resp.json()
    body = json.loads(INFINITY_EXAMPLE)
    want = reference(flag_reranker, [[body["query"], d] for d in body["documents"]], normalize=True)
    assert set(got) == {"object", "results", "model", "usage", "id", "created"} and got["object"] == "rerank"
    assert [r["index"] for r in got["results"]] == ranked(want)
    assert_close([r["relevance_score"] for r in got["results"]], [want[i] for i in ranked(want)])
    assert all(r["document"] is None for r in got["results"])
    assert got["usage"]["total_tokens"] > 0 and isinstance(got["created"], int) and got["id"]


async def test_infinity_top_n_documents_and_lax_booleans(bridge: TestClient, flag_reranker: Any) -> None:
    docs = ["hi", PANDA, "The quick brown fox jumps over the lazy dog."]
    body = {"query": "what is panda?", "documents": docs, "return_documents": "true", "raw_scores": True, "top_n": 2}
    got = await (await bridge.post("/rerank", json=body)).json()
    want = reference(flag_reranker, [["what is panda?", d] for d in docs])
    assert [(r["index"], r["document"]) for r in got["results"]] == [(i, docs[i]) for i in ranked(want)[:2]]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"query": "q"}, 'legacy 2\'s {"query", "compare_to"}, TEI\'s {"query", "texts"} or Infinity\'s'),
        ({"query": "q", "texts": ["a"], "documents": ["b"]}, "the body has texts and documents; send exactly one"),
        ({"query": "q", "texts": "a"}, "texts must be a list of strings, got a string"),
        ({"query": "q", "texts": ["a"], "truncation_direction": "up"}, "truncation_direction must be one of"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n must be at least 1, got 0"),
        ({"query": "q", "documents": []}, "documents is empty"),
    ],
)
async def test_rerank_bad_bodies_are_400_naming_the_problem(bridge: TestClient, body: Any, problem: str) -> None:
    resp = await bridge.post("/rerank", json=body)
    assert resp.status == 400
    assert problem in (await resp.json())["error"]


async def test_v1_rank_fields_return_documents_and_chunks(bridge: TestClient, engine: Any, flag_reranker: Any) -> None:
    docs: list[Any] = [{"title": "Pandas", "text": PANDA, "year": 2026}, "hi", {"title": "Long", "text": LONG[0]}]
    body = {"query": "what is panda?", "documents": docs, "rank_fields": ["title", "text"], "return_documents": True}
    got = await (await bridge.post("/v1/rerank", json=body)).json()
    texts = [f"title: Pandas\ntext: {PANDA}", "hi", f"title: Long\ntext: {LONG[0]}"]
    want = reference(flag_reranker, [["what is panda?", t] for t in texts], normalize=True)
    assert [r["index"] for r in got["results"]] == ranked(want)
    assert [r["document"] for r in got["results"]] == [docs[i] if i != 1 else {"text": "hi"} for i in ranked(want)]
    assert got["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}
    chunked = await (await bridge.post("/v1/rerank", json={**body, "max_chunks_per_doc": 10})).json()
    windows = Splitter(engine.flag, 512).split("what is panda?", texts[2])
    best = max(reference(flag_reranker, [["what is panda?", w] for w in windows], normalize=True))
    assert {r["index"]: r["relevance_score"] for r in chunked["results"]}[2] == pytest.approx(best, **FP32_REORDERED)
    resp = await bridge.post("/v1/rerank", json={**body, "max_chunks_per_doc": 2})
    message = (await resp.json())["message"]
    assert resp.status == 400 and "candidates[2] needs" in message and "max_chunks_per_doc" in message


async def test_v2_rerank_and_cohere_error_shape(bridge: TestClient, flag_reranker: Any) -> None:
    docs = ["hi", PANDA, LONG[0]]
    resp = await bridge.post("/v2/rerank", json={"model": "rerank-v3.5", "query": "what is panda?", "documents": docs})
    got = await resp.json()
    assert set(got) == {"id", "results", "meta"} and got["meta"]["api_version"] == {"version": "2"}
    assert all(set(r) == {"index", "relevance_score"} for r in got["results"])
    scores = [r["relevance_score"] for r in got["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    resp = await bridge.post("/v2/rerank", json={"query": "q", "documents": [{"text": "a"}]})
    assert resp.status == 400 and await resp.json() == {"message": "documents[0] must be a string, got an object"}
    resp = await bridge.get("/v2/nope")
    assert resp.status == 404 and set(await resp.json()) == {"message"}


async def test_info_in_tei_shape(bridge: TestClient, server: RerankServer) -> None:
    got = await (await bridge.get("/info")).json()
    assert got["model_id"] == server.config.default_model and got["max_input_length"] == server.config.max_length
    assert got["max_client_batch_size"] == server.config.max_candidates and got["model_dtype"] == "float32"
    assert "reranker" in got["model_type"] and got["version"]


async def test_grpc_errors_keep_each_shape(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{free_port()}")))  # nothing there
    resp = await client.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
    assert resp.status == 503 and "cannot be reached" in (await resp.json())["message"]
    resp = await client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert resp.status == 503 and (await resp.json())["status"] == 503
