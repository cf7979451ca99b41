"""NVIDIA NIM's ranking API, Voyage's and Mixedbread's answers field by field, TEI's truncation, and the one rule
that tells dialects apart on shared paths: real server, real bridge, the tiny model.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rest_bridge import BridgeConfig, create_app
from rest_bridge.config import load_bridge_config
from server.app import RerankServer
from tests.conftest import FP32_REORDERED
from tests.test_bridge import PANDA, assert_close, reference
from tests.test_chunking import LONG

QUERY = "what is panda?"
DOCS = ["hi", PANDA, "The quick brown fox jumps over the lazy dog."]


@pytest.fixture
async def bridge(server: RerankServer, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}")))


def best_first(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])


# ---------------------------------------------------------------- NVIDIA NIM


@pytest.mark.parametrize("path", ["/v1/ranking", "/v1/retrieval/nvidia/nv-rerankqa-mistral-4b-v3/reranking"])
async def test_nim_ranking_raw_logits_best_first(bridge: TestClient, flag_reranker: Any, path: str) -> None:
    body = {
        "model": "nvidia/llama-3.2-nv-rerankqa-1b-v2",
        "query": {"text": QUERY},
        "passages": [{"text": d} for d in DOCS],
    }
    resp = await bridge.post(path, json=body)
    assert resp.status == 200
    got = await resp.json()
    assert set(got) == {"rankings", "usage"} and all(list(r) == ["index", "logit"] for r in got["rankings"])
    want = reference(flag_reranker, [[QUERY, d] for d in DOCS])  # raw logits
    assert [r["index"] for r in got["rankings"]] == best_first(want)
    assert_close([r["logit"] for r in got["rankings"]], sorted(want, reverse=True))


async def test_nim_truncate_end_matches_compute_score_and_none_refuses(bridge: TestClient, flag_reranker: Any) -> None:
    body: dict[str, Any] = {"query": {"text": QUERY}, "passages": [{"text": "hi"}, {"text": LONG[0]}]}
    resp = await bridge.post("/v1/ranking", json={**body, "truncate": "END"})
    want = reference(flag_reranker, [[QUERY, "hi"], [QUERY, LONG[0]]])
    assert {r["index"]: r["logit"] for r in (await resp.json())["rankings"]} == pytest.approx(
        dict(enumerate(want)), **FP32_REORDERED
    )
    for refused in (body, {**body, "truncate": "NONE"}):  # NONE is NIM's default
        resp = await bridge.post("/v1/ranking", json=refused)
        got = await resp.json()
        assert resp.status == 400 and set(got) == {"type", "title", "status", "detail"} and got["status"] == 400
        assert got["title"] == "Bad Request" and got["detail"].startswith(
            "passages[1] exceeds the maximum token length of 512"
        )


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"query": "q", "passages": [{"text": "a"}]}, "query must be an object, got a string"),
        ({"query": {"text": "q"}, "passages": [{"text": 3}]}, "passages[0].text must be a string, got a number"),
        ({"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"}, "truncate must be one of"),
        (
            {"query": {"text": "q"}, "passages": [{"text": "a"}], "top_n": 1},
            "top_n (Infinity, Cohere v1, Cohere v2, vLLM",
        ),
    ],
)
async def test_nim_errors_in_its_shape(bridge: TestClient, body: Any, problem: str) -> None:
    resp = await bridge.post("/v1/ranking", json=body)
    got = await resp.json()
    assert resp.status == 400 and got["status"] == 400 and problem in got["detail"], got


# ---------------------------------------------------------------- Voyage and Mixedbread, field by field


async def test_voyage_answer_and_error_shape(bridge: TestClient, flag_reranker: Any) -> None:
    body = {"query": QUERY, "documents": DOCS, "model": "rerank-2.5", "top_k": 2, "return_documents": True}
    got = await (await bridge.post("/voyage/v1/rerank", json=body)).json()
    assert (
        set(got) == {"object", "data", "model", "usage"}
        and got["object"] == "list"
        and set(got["usage"]) == {"total_tokens"}
    )
    want = reference(flag_reranker, [[QUERY, d] for d in DOCS], normalize=True)
    order = best_first(want)[:2]
    assert [(r["index"], r["document"]) for r in got["data"]] == [(i, DOCS[i]) for i in order]
    assert all(
        set(r) == {"index", "relevance_score"}
        for r in (
            await (await bridge.post("/rerank", json={**body, "return_documents": False, "truncation": True})).json()
        )["data"]
    )
    resp = await bridge.post("/voyage/v1/rerank", json={"query": QUERY, "documents": "hi"})
    assert resp.status == 400 and await resp.json() == {"detail": "documents must be a list of strings, got a string"}


async def test_voyage_truncation_matches_compute_score(bridge: TestClient, flag_reranker: Any) -> None:
    body = {"query": QUERY, "documents": ["hi", LONG[0]], "truncation": True}
    got = (await (await bridge.post("/v1/rerank", json=body)).json())["data"]
    want = reference(flag_reranker, [[QUERY, "hi"], [QUERY, LONG[0]]], normalize=True)
    assert {r["index"]: r["relevance_score"] for r in got} == pytest.approx(dict(enumerate(want)), **FP32_REORDERED)


async def test_cohere_v2_max_tokens_per_doc(bridge: TestClient) -> None:
    body = {"model": "rerank-v3.5", "query": QUERY, "documents": ["hi", LONG[0]]}
    whole = await (await bridge.post("/v2/rerank", json=body)).json()
    for at_least_the_pair in (512, 4096):  # cannot bind: the same scores as without it
        same = await (await bridge.post("/v2/rerank", json={**body, "max_tokens_per_doc": at_least_the_pair})).json()
        assert same["results"] == whole["results"]
    resp = await bridge.post("/v2/rerank", json={**body, "max_tokens_per_doc": 100})
    assert resp.status == 400
    assert (await resp.json())["message"].startswith("max_tokens_per_doc 100 is below the model's pair limit of 512")


async def test_mixedbread_answer_fields(bridge: TestClient) -> None:
    body = {"query": QUERY, "input": [{"title": "t", "body": PANDA}, "hi"], "rank_fields": ["title", "body"]}
    got = await (await bridge.post("/v1/reranking", json=body)).json()
    assert set(got) == {"usage", "model", "data", "object", "top_k", "return_input"} and got["object"] == "list"
    assert got["top_k"] == 2 and got["return_input"] is False
    assert all(set(d) == {"index", "score", "object"} and d["object"] == "rank_result" for d in got["data"])
    resp = await bridge.post("/v1/reranking", json={**body, "rewrite_query": True})
    assert resp.status == 400 and "rewrite_query is not supported" in (await resp.json())["detail"]


# ---------------------------------------------------------------- TEI's truncation


async def test_tei_truncate_false_refuses_like_tei(bridge: TestClient) -> None:
    resp = await bridge.post("/tei/rerank", json={"query": QUERY, "texts": ["hi", LONG[0]], "truncate": False})
    got = await resp.json()
    assert resp.status == 413 and got["status"] == 413
    assert got["error"].startswith("Input validation error: texts[1] does not fit beside the query in 512 tokens")
    resp = await bridge.post(
        "/rerank", json={"query": QUERY, "texts": ["a"], "truncate": True, "max_chunks_per_doc": 4}
    )
    assert resp.status == 400 and "send one of them" in (await resp.json())["error"]


async def test_auto_truncate_off_refuses_a_body_without_truncate(server: RerankServer, aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}", auto_truncate=False)))
    resp = await client.post("/rerank", json={"query": QUERY, "texts": ["hi", LONG[0]]})
    assert resp.status == 413
    assert (await (await client.get("/info")).json())["auto_truncate"] is False
    resp = await client.post("/rerank", json={"query": QUERY, "texts": ["hi", LONG[0]], "truncate": True})
    assert resp.status == 200


def test_auto_truncate_setting_parses_as_a_boolean() -> None:
    assert load_bridge_config([], env={}).auto_truncate is True  # TEI's default
    assert load_bridge_config([], env={"RERANKER_REST_AUTO_TRUNCATE": "off"}).auto_truncate is False
    assert load_bridge_config(["--auto-truncate", "false"], env={}).auto_truncate is False
    with pytest.raises(SystemExit):
        load_bridge_config([], env={"RERANKER_REST_AUTO_TRUNCATE": "maybe"})


# ---------------------------------------------------------------- one rule for shared paths


@pytest.mark.parametrize(
    ("path", "body", "keys"),
    [
        ("/rerank", {"query": QUERY, "documents": DOCS}, {"object", "results", "model", "usage", "id", "created"}),
        (
            "/rerank",
            {"query": QUERY, "documents": DOCS, "top_k": None, "truncation": True},
            {"object", "data", "model", "usage"},
        ),
        (
            "/rerank",
            {"query": QUERY, "documents": DOCS, "truncate_prompt_tokens": -1},
            {"id", "model", "usage", "results"},
        ),
        ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 1}, {"id", "results", "meta", "model", "usage"}),
        ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_k": 1}, {"object", "data", "model", "usage"}),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": DOCS, "use_activation": True},
            {"id", "model", "usage", "results"},
        ),
        ("/v2/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 4096}, {"id", "results", "meta"}),
        ("/v2/rerank", {"query": QUERY, "documents": DOCS, "instruction": ""}, {"id", "model", "usage", "results"}),
    ],
)
async def test_shared_paths_tell_dialects_by_the_body(bridge: TestClient, path: str, body: Any, keys: set[str]) -> None:
    resp = await bridge.post(path, json=body)
    assert resp.status == 200 and set(await resp.json()) == keys


@pytest.mark.parametrize(
    ("path", "body", "problem", "shape"),
    [
        (
            "/v1/rerank",
            {"query": "q", "documents": ["a"], "top_k": 1, "rank_fields": ["text"]},
            "mixes fields of different APIs: rank_fields (Cohere v1, Mixedbread), top_k (Voyage, Mixedbread)",
            "message",
        ),
        (
            "/rerank",
            {"query": "q", "texts": ["a"], "top_n": 1},
            "top_n (Infinity, Cohere v1, Cohere v2, vLLM rerank) is not TEI's",
            "error",
        ),
        (
            "/rerank",
            {"query": "q", "documents": ["a"], "raw_scores": True, "truncation": False},
            "raw_scores (TEI, Infinity, Cohere v1), truncation (Voyage)",
            "error",
        ),
        (
            "/cohere/v2/rerank",
            {"query": "q", "documents": ["a"], "return_documents": True},
            "return_documents (Infinity, Cohere v1, vLLM rerank, Voyage) is not Cohere v2's",
            "message",
        ),
        ("/voyage/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 1}, "is not Voyage's", "detail"),
    ],
)
async def test_a_foreign_field_is_refused_never_dropped(
    bridge: TestClient, path: str, body: Any, problem: str, shape: str
) -> None:
    resp = await bridge.post(path, json=body)
    got = await resp.json()
    assert resp.status == 400 and problem in got[shape], got
