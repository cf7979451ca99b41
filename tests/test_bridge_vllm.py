"""vLLM's rerank and score APIs through the bridge: shapes field by field against vLLM's protocol classes, every
route, each truncation field's parity with FlagReranker.compute_score at the same limits, and vLLM's error body.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from reranker_proto import reranker_pb2 as pb
from rest_bridge import BridgeConfig, create_app
from rest_bridge.dialects_vllm import VLLM_RERANK, VLLM_SCORE
from rest_bridge.models import parse
from server.app import RerankServer
from server.chunking import Splitter
from tests.conftest import FP32_REORDERED
from tests.test_bridge import PANDA, assert_close
from tests.test_chunking import LONG

QUERY = "what is panda?"
DOCS = ["hi", PANDA, LONG[0]]
RERANK_PATHS = ["/rerank", "/v1/rerank", "/v2/rerank", "/vllm/rerank", "/vllm/v1/rerank", "/vllm/v2/rerank"]
SCORE_PATHS = ["/score", "/v1/score", "/vllm/score", "/vllm/v1/score"]


@pytest.fixture
async def bridge(server: RerankServer, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}")))


def scores(flag_reranker: Any, pairs: list[list[str]], **limits: Any) -> list[float]:
    got = flag_reranker.compute_score(pairs, **limits)
    return got if isinstance(got, list) else [got]


def best_first(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])


def is_vllm_error(body: Any, status: int) -> bool:
    """vLLM's ErrorResponse: {"error": {"message": str, "type": str, "param": str | None, "code": int}}."""
    error = body["error"]
    return set(body) == {"error"} and set(error) == {"message", "type", "param", "code"} and error["code"] == status


@pytest.mark.parametrize("path", RERANK_PATHS)
async def test_rerank_answers_vllms_shape_on_every_path(bridge: TestClient, flag_reranker: Any, path: str) -> None:
    docs = DOCS[:2] + ["The quick brown fox jumps over the lazy dog."]
    body = {"model": "BAAI/bge-reranker-base", "query": QUERY, "documents": docs, "top_n": 2, "use_activation": True}
    resp = await bridge.post(path, json=body, headers={"X-Request-Id": "req-7"})
    assert resp.status == 200
    got = await resp.json()
    # RerankResponse: id, model, usage {prompt_tokens, total_tokens}, results [{index, document, relevance_score}]
    assert set(got) == {"id", "model", "usage", "results"} and got["id"] == "req-7" and got["model"]
    assert set(got["usage"]) == {"prompt_tokens", "total_tokens"} and got["usage"]["total_tokens"] > 0
    want = scores(flag_reranker, [[QUERY, d] for d in docs], normalize=True)
    order = best_first(want)[:2]
    assert [list(r) for r in got["results"]] == [["index", "document", "relevance_score"]] * 2
    assert [r["index"] for r in got["results"]] == order
    assert [r["document"] for r in got["results"]] == [{"text": docs[i]} for i in order]
    assert_close([r["relevance_score"] for r in got["results"]], [want[i] for i in order])


async def test_rerank_options(bridge: TestClient, flag_reranker: Any) -> None:
    docs: list[Any] = [{"text": "hi"}, PANDA]
    body = {"query": QUERY, "documents": docs, "use_activation": False, "return_documents": False, "request_id": "r1"}
    got = await (await bridge.post("/vllm/rerank", json=body)).json()
    want = scores(flag_reranker, [[QUERY, "hi"], [QUERY, PANDA]])  # raw logits
    assert got["id"] == "r1" and all(set(r) == {"index", "relevance_score"} for r in got["results"])
    assert_close([r["relevance_score"] for r in got["results"]], [want[i] for i in best_first(want)])
    one = await (await bridge.post("/vllm/rerank", json={"query": QUERY, "documents": PANDA, "priority": 5})).json()
    assert [r["index"] for r in one["results"]] == [0]  # one document as a plain string, as vLLM takes it


async def test_truncate_prompt_tokens_and_side_match_compute_score(bridge: TestClient, flag_reranker: Any) -> None:
    body: dict[str, Any] = {"query": QUERY, "documents": DOCS, "truncate_prompt_tokens": 64, "use_activation": False}
    got = await (await bridge.post("/vllm/rerank", json=body)).json()
    want = scores(flag_reranker, [[QUERY, d] for d in DOCS], max_length=64)
    assert {r["index"]: r["relevance_score"] for r in got["results"]} == pytest.approx(
        dict(enumerate(want)), **FP32_REORDERED
    )
    whole = await (await bridge.post("/vllm/rerank", json={**body, "truncate_prompt_tokens": -1})).json()
    want = scores(flag_reranker, [[QUERY, d] for d in DOCS])  # -1: the model's own limit
    assert {r["index"]: r["relevance_score"] for r in whole["results"]} == pytest.approx(
        dict(enumerate(want)), **FP32_REORDERED
    )


async def test_truncation_side_left_keeps_the_end(bridge: TestClient, engine: Any, flag_reranker: Any) -> None:
    body = {"query": QUERY, "documents": [LONG[0]], "truncate_prompt_tokens": 128, "truncation_side": "left"}
    got = await (await bridge.post("/vllm/rerank", json={**body, "use_activation": False})).json()
    (last,) = Splitter(engine.flag, 128).split(QUERY, LONG[0], keep_end_only=True)
    assert got["results"][0]["relevance_score"] == pytest.approx(
        scores(flag_reranker, [[QUERY, last]], max_length=128)[0], **FP32_REORDERED
    )


async def test_max_tokens_per_query_matches_query_max_length(bridge: TestClient, flag_reranker: Any) -> None:
    query = " ".join(["what is the giant panda and where does it live?"] * 30)  # far over 16 tokens
    body = {"query": query, "documents": DOCS[:2], "max_tokens_per_query": 16, "truncate_prompt_tokens": -1}
    got = await (await bridge.post("/vllm/rerank", json={**body, "use_activation": False})).json()
    want = scores(flag_reranker, [[query, d] for d in DOCS[:2]], query_max_length=16)
    assert {r["index"]: r["relevance_score"] for r in got["results"]} == pytest.approx(
        dict(enumerate(want)), **FP32_REORDERED
    )


async def test_over_long_pair_is_refused_without_truncate_prompt_tokens(bridge: TestClient, engine: Any) -> None:
    resp = await bridge.post("/vllm/v1/rerank", json={"query": QUERY, "documents": DOCS})
    body = await resp.json()
    assert resp.status == 400 and is_vllm_error(body, 400) and body["error"]["type"] == "BadRequestError"
    message = body["error"]["message"]
    assert message.startswith("documents[2] does not fit") and f"{engine.max_length} tokens" in message
    windows = await (
        await bridge.post("/vllm/rerank", json={"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 8})
    ).json()
    assert len(windows["results"]) == 3  # the extension: its best window scores


async def test_max_tokens_per_doc_is_honoured_only_where_it_cannot_bind(bridge: TestClient, flag_reranker: Any) -> None:
    body: dict[str, Any] = {"query": QUERY, "documents": DOCS, "truncate_prompt_tokens": 64, "use_activation": False}
    same = await (await bridge.post("/vllm/rerank", json={**body, "max_tokens_per_doc": 64})).json()
    want = scores(flag_reranker, [[QUERY, d] for d in DOCS], max_length=64)
    assert {r["index"]: r["relevance_score"] for r in same["results"]} == pytest.approx(
        dict(enumerate(want)), **FP32_REORDERED
    )
    resp = await bridge.post("/vllm/rerank", json={**body, "max_tokens_per_doc": 32})
    message = (await resp.json())["error"]["message"]
    assert resp.status == 400 and "max_tokens_per_doc 32 is below the model's pair limit of 64 tokens" in message


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"query": QUERY, "documents": ["a"], "truncate_prompt_tokens": 100000}, "greater than max_model_len (512)"),
        ({"query": QUERY, "documents": ["a"], "truncate_prompt_tokens": 0}, "must be -1 (the model's limit) or at"),
        (
            {"query": QUERY, "documents": ["a"], "truncate_prompt_tokens": -2},
            "truncate_prompt_tokens must be at least -1",
        ),
        ({"query": QUERY, "documents": ["a"], "max_tokens_per_query": 512}, "max_tokens_per_query (512) must be less"),
        ({"query": QUERY, "documents": ["a"], "truncation_side": "middle"}, "truncation_side must be one of"),
        (
            {"query": QUERY, "documents": ["a"], "chat_template_kwargs": {"x": 1}},
            "chat_template_kwargs.x is not supported",
        ),
        ({"query": QUERY, "documents": [{"content": []}]}, "documents[0] is a multi-modal input"),
        ({"query": QUERY, "documents": []}, "documents is empty"),
        ({"query": QUERY, "documents": ["a"], "top_n": -1}, "top_n must be at least 0"),
        ({"query": QUERY, "documents": ["a"], "texts": ["b"]}, "texts (TEI) is not vLLM rerank's"),
    ],
)
async def test_bad_rerank_bodies_get_vllms_error(bridge: TestClient, body: Any, problem: str) -> None:
    resp = await bridge.post("/vllm/rerank", json=body)
    got = await resp.json()
    assert resp.status == 400 and is_vllm_error(got, 400), got
    assert problem in got["error"]["message"]


def test_instruction_kwargs_and_limits_reach_the_contract() -> None:
    """vLLM folds `instruction` into chat_template_kwargs, the explicit key winning: so does the bridge."""
    config = BridgeConfig()
    parsed = parse(VLLM_RERANK.model, {"query": "q", "documents": ["d"], "instruction": "top"})
    assert VLLM_RERANK.request(parsed, config).instruction == "top"
    both = {"query": "q", "documents": ["d"], "instruction": "top", "chat_template_kwargs": {"instruction": "kw"}}
    assert VLLM_RERANK.request(parse(VLLM_RERANK.model, both), config).instruction == "kw"
    limited = {"query": "q", "documents": ["d"], "max_tokens_per_query": 16, "truncate_prompt_tokens": 100}
    req = VLLM_RERANK.request(parse(VLLM_RERANK.model, limited), config)
    assert (req.query_max_length, req.max_length, req.long_documents) == (16, 100, pb.LONG_DOCUMENTS_TRUNCATE)
    score = parse(VLLM_SCORE.model, {"text_1": "q", "text_2": ["a", "b"], "chat_template_kwargs": {"instruction": "i"}})
    req = VLLM_SCORE.request(score, config)
    assert req.instruction == "i" and req.query == "q" and list(req.candidates) == ["a", "b"]
    assert req.long_documents == pb.LONG_DOCUMENTS_CHUNK and req.max_windows_per_doc == 1  # refuse, as vLLM


@pytest.mark.parametrize("path", SCORE_PATHS)
@pytest.mark.parametrize(
    ("first", "second"), [("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2")]
)
async def test_score_one_to_many(bridge: TestClient, flag_reranker: Any, path: str, first: str, second: str) -> None:
    resp = await bridge.post(path, json={first: QUERY, second: DOCS[:2], "model": "m"})
    assert resp.status == 200
    got = await resp.json()
    # ScoreResponse: id, object "list", created, model, data [{index, object "score", score}], usage
    assert set(got) == {"id", "object", "created", "model", "data", "usage"} and got["object"] == "list"
    assert isinstance(got["created"], int) and got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
    assert [d["index"] for d in got["data"]] == [0, 1] and {d["object"] for d in got["data"]} == {"score"}
    assert_close(
        [d["score"] for d in got["data"]], scores(flag_reranker, [[QUERY, d] for d in DOCS[:2]], normalize=True)
    )


async def test_score_many_to_many_zips(bridge: TestClient, flag_reranker: Any) -> None:
    queries = [QUERY, "what is the weather like?"]
    got = await (await bridge.post("/score", json={"text_1": queries, "text_2": [PANDA, "今天天气怎么样"]})).json()
    want = scores(flag_reranker, [[queries[0], PANDA], [queries[1], "今天天气怎么样"]], normalize=True)
    assert_close([d["score"] for d in got["data"]], want)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "Input lengths must be either 1:1, 1:N or N:N; got 2:3"),
        ({"text_1": ["a", "b"], "text_2": "c"}, "got 2:1"),
        ({"text_1": "a"}, "send exactly one pair of inputs"),
        ({"queries": "a", "documents": ["b"], "items": ["c"]}, "send exactly one pair of inputs"),
        ({"text_1": "a", "text_2": [5]}, "text_2[0] must be a string, got a number"),
        ({"text_1": "a", "text_2": ["x" * 4000]}, "text_2[0] does not fit beside the query"),
    ],
)
async def test_bad_score_bodies_get_vllms_error(bridge: TestClient, body: Any, problem: str) -> None:
    resp = await bridge.post("/v1/score", json=body)
    got = await resp.json()
    assert resp.status == 400 and is_vllm_error(got, 400) and problem in got["error"]["message"], got
