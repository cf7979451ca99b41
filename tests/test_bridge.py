"""The REST bridge end to end: real gRPC server, real bridge app, the tiny model, scores vs FlagReranker."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rest_bridge import BridgeConfig, create_app
from server.app import RerankServer
from tests.conftest import FP32_REORDERED

PANDA = (
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
    "is a bear species endemic to China."
)
# Verbatim from the legacy READMEs (../shared/seeds/).
SEED_1_TEXT_PAIRS = (
    "[['what is panda?', 'hi'],['what is panda?', 'The giant panda (Ailuropoda melanoleuca), sometimes called "
    "a panda bear or simply panda, is a bear species endemic to China.']]"
)
SEED_2_BODY = """{
  "query": "什么是函数计算",
  "compare_to": [
    "你好",
    "函数计算是阿里云Serverless计算服务，提供专业的Serverless架构服务托管",
    "今天天气怎么样"
  ]
}"""
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


def reference(flag_reranker: Any, pairs: list[list[str]], normalize: bool = False) -> list[float]:
    scores = flag_reranker.compute_score(pairs, normalize=normalize)
    return scores if isinstance(scores, list) else [scores]


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, **FP32_REORDERED)


@pytest.fixture
async def bridge(server: RerankServer, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}")))


# ---------------------------------------------------------------- legacy 1


async def test_legacy_1_seed_payload_gives_raw_logits(bridge: TestClient, flag_reranker: Any) -> None:
    data = {"text_pairs": SEED_1_TEXT_PAIRS}
    resp = await bridge.post(
        "/bge-reranker-base/post", data=json.dumps(data), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    body = await resp.json()
    pairs = [["what is panda?", "hi"], ["what is panda?", PANDA]]
    assert body["text_pairs"] == pairs and body["code"] == 200
    assert_close(body["rerank_scores"], reference(flag_reranker, pairs))
    assert TIMESTAMP.match(body["request_time"]) and TIMESTAMP.match(body["response_time"])
    assert set(body) == {"text_pairs", "rerank_scores", "request_time", "response_time", "code"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_legacy_1_accepts_a_json_list_and_any_content_type(
    bridge: TestClient, flag_reranker: Any, content_type: str | None
) -> None:
    pairs = [["什么是函数计算", "你好"], ["q", 'it\'s "quoted"\n'], ["what is panda?", PANDA]]
    headers = {"Content-Type": content_type} if content_type else {}
    for text_pairs in (pairs, str(pairs), str([tuple(p) for p in pairs])):
        resp = await bridge.post(
            "/bge-reranker-base/post", data=json.dumps({"text_pairs": text_pairs}), headers=headers
        )
        body = await resp.json()
        assert resp.status == 200 and body["code"] == 200, body
        assert body["text_pairs"] == pairs
        assert_close(body["rerank_scores"], reference(flag_reranker, pairs))


@pytest.mark.parametrize(
    ("text_pairs", "problem"),
    [
        ("[['q', 'p'", "at character"),
        ("[['q']]", "exactly two strings"),
        ("[['q', 'p', 'r']]", "exactly two strings"),
        ("[]", "empty list"),
        ([], "empty list"),
        ([["q"]], "text_pairs[0] must be a [query, passage] list of two strings"),
        ([["q", 1]], "text_pairs[0][1] must be a string"),
        (42, "text_pairs must be a string"),
        ("[['', 'p']]", "pairs[0].query is empty"),  # the server's own rule, same envelope
    ],
)
async def test_legacy_1_failure_keeps_the_legacy_envelope(bridge: TestClient, text_pairs: Any, problem: str) -> None:
    resp = await bridge.post("/bge-reranker-base/post", data=json.dumps({"text_pairs": text_pairs}))
    assert resp.status == 200
    body = await resp.json()
    assert body["code"] == -1 and body["rerank_scores"] == [] and body["text_pairs"] == text_pairs
    assert problem in body["error"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'{"pairs": []}'])
async def test_legacy_1_malformed_body_keeps_the_envelope(bridge: TestClient, body: bytes) -> None:
    resp = await bridge.post("/bge-reranker-base/post", data=body)
    assert resp.status == 200
    got = await resp.json()
    assert got["code"] == -1 and got["rerank_scores"] == [] and got["text_pairs"] is None and got["error"]


ATTACKS = [
    "__import__('os').system('touch {marker}')",
    "[[__import__('os').system('touch {marker}'), 'p']]",
    "[['q', (lambda: __import__('os').system('touch {marker}'))()]]",
    "[['q', f'{{__import__(\"os\").system(\"touch {marker}\")}}']]",
    "[['q', open('{marker}', 'w').write('x')]]",
    "[['q', 'p']] + [exec(\"open('{marker}', 'w')\")]",
    "[['q', 'p'], *[eval(\"open('{marker}', 'w')\")]]",
    "[['q', b'bytes']]",
    "[['q', 'p']]; import os; os.system('touch {marker}')",
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_legacy_1_text_that_tries_to_run_code_is_refused_and_runs_nothing(
    bridge: TestClient, tmp_path: Path, attack: str
) -> None:
    marker = tmp_path / "pwned"
    text = attack.format(marker=marker)
    resp = await bridge.post("/bge-reranker-base/post", data=json.dumps({"text_pairs": text}))
    body = await resp.json()
    assert resp.status == 200 and body["code"] == -1 and body["text_pairs"] == text
    assert "text_pairs" in body["error"]
    assert not marker.exists()


async def test_legacy_1_pair_and_size_limits(server: RerankServer, aiohttp_client: Any) -> None:
    config = BridgeConfig(grpc_target=f"127.0.0.1:{server.port}", max_pairs=3, max_body_bytes=2000)
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/bge-reranker-base/post", data=json.dumps({"text_pairs": str([["q", "p"]] * 4)}))
    body = await resp.json()
    assert body["code"] == -1 and "more than 3 pairs; the limit is 3" in body["error"]
    resp = await client.post("/bge-reranker-base/post", data=json.dumps({"text_pairs": str([["q", "p" * 3000]])}))
    body = await resp.json()
    assert resp.status == 413 and body["code"] == -1 and "limit of 2000 bytes" in body["error"]


# ---------------------------------------------------------------- legacy 2


@pytest.mark.parametrize("path", ["/rerank", "/reank"])
async def test_legacy_2_seed_payload_gives_sigmoid_scores(bridge: TestClient, flag_reranker: Any, path: str) -> None:
    resp = await bridge.post(path, data=SEED_2_BODY.encode(), headers={"Content-Type": "application/json"})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    request = json.loads(SEED_2_BODY)
    pairs = [[request["query"], c] for c in request["compare_to"]]
    assert_close(body["data"], reference(flag_reranker, pairs, normalize=True))


async def test_legacy_2_one_element_list_works(bridge: TestClient, flag_reranker: Any) -> None:
    resp = await bridge.post("/rerank", json={"query": "what is panda?", "compare_to": [PANDA]})
    assert resp.status == 200
    assert_close((await resp.json())["data"], reference(flag_reranker, [["what is panda?", PANDA]], normalize=True))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"query": "q", "compare_to": []}, "compare_to is empty"),
        ({"query": "q"}, '"compare_to" is required'),
        ({"compare_to": ["a"]}, '"query" is required'),
        ({"query": "q", "compare_to": "a"}, "compare_to must be a list of strings, got a string"),
        ({"query": "q", "compare_to": ["a", 3]}, "compare_to[1] must be a string, got a number"),
        ({"query": 1, "compare_to": ["a"]}, "query must be a string"),
        ({"query": " ", "compare_to": ["a"]}, "query is empty"),  # INVALID_ARGUMENT from the server
        ({"query": "q", "compare_to": ["x" * 20001]}, "the limit is 20000"),
        ({"query": "\ud800", "compare_to": ["a"]}, "not valid Unicode"),
        ([1, 2], "must be a JSON object, got a list"),
    ],
)
async def test_legacy_2_bad_input_is_400_naming_the_problem(bridge: TestClient, body: Any, problem: str) -> None:
    resp = await bridge.post("/rerank", data=json.dumps(body))
    assert resp.status == 400
    got = await resp.json()
    assert problem in got["error"] and got["status"] == 400


async def test_malformed_json_and_unknown_routes_get_json_errors(bridge: TestClient) -> None:
    resp = await bridge.post("/rerank", data=b'{"query": ')
    assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]
    resp = await bridge.post("/rerank", data=b"\xff\xfe\x00")
    assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]
    resp = await bridge.post("/v1/rerank", data=b"[" * 100_000)
    assert resp.status == 400 and "nested too deeply" in (await resp.json())["message"]  # Cohere's error shape
    resp = await bridge.get("/rerank")
    assert resp.status == 405 and "use POST" in (await resp.json())["error"]
    resp = await bridge.post("/nope", json={})
    assert resp.status == 404 and (await resp.json())["error"]


async def test_oversize_body_is_413(server: RerankServer, aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}", max_body_bytes=1000)))
    resp = await client.post("/v1/rerank", json={"query": "q", "documents": ["x" * 2000]})
    assert resp.status == 413
    assert await resp.json() == {"message": "request body is larger than the limit of 1000 bytes"}


# ---------------------------------------------------------------- /v1/rerank


async def test_v1_rerank_cohere_shape(bridge: TestClient, flag_reranker: Any) -> None:
    docs = ["hi", PANDA, "The quick brown fox jumps over the lazy dog."]
    # What Cohere's and Jina's clients send (LangChain, LlamaIndex, Haystack use these).
    body = {"model": "rerank-english-v3.0", "query": "what is panda?", "documents": docs, "top_n": 2}
    resp = await bridge.post("/v1/rerank", json=body, headers={"X-Request-Id": "req-42"})
    assert resp.status == 200
    got = await resp.json()
    want = reference(flag_reranker, [["what is panda?", d] for d in docs], normalize=True)
    order = sorted(range(3), key=lambda i: -want[i])[:2]
    assert got["id"] == "req-42" and got["model"]
    assert [r["index"] for r in got["results"]] == order
    assert_close([r["relevance_score"] for r in got["results"]], [want[i] for i in order])
    assert all("document" not in r for r in got["results"])
    assert got["usage"]["total_tokens"] > 0


async def test_v1_rerank_documents_objects_raw_scores_and_return_documents(
    bridge: TestClient, flag_reranker: Any
) -> None:
    docs = ["hi", PANDA]
    body = {
        "query": "what is panda?",
        "documents": [{"text": d} for d in docs],
        "return_documents": True,
        "raw_scores": True,
        "top_n": 10,
    }
    got = await (await bridge.post("/v1/rerank", json=body)).json()
    want = reference(flag_reranker, [["what is panda?", d] for d in docs])
    order = sorted(range(2), key=lambda i: -want[i])
    assert [r["index"] for r in got["results"]] == order
    assert [r["document"] for r in got["results"]] == [{"text": docs[i]} for i in order]
    assert_close([r["relevance_score"] for r in got["results"]], [want[i] for i in order])
    assert got["id"]  # a fresh id without X-Request-Id


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"query": "q", "documents": []}, "documents is empty"),
        ({"query": "q", "documents": [{"txt": "a"}]}, 'documents[0] is an object without "text"'),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n must be at least 1"),
        ({"query": "q", "documents": ["a"], "top_n": "2"}, "top_n must be an integer"),
        ({"query": "q", "documents": ["a"], "top_n": True}, "top_n must be an integer"),
        ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents must be true or false"),
        ({"query": "q", "documents": ["a"], "model": 3}, "model must be a string"),
    ],
)
async def test_v1_rerank_bad_input_is_400(bridge: TestClient, body: Any, problem: str) -> None:
    resp = await bridge.post("/v1/rerank", json=body)
    assert resp.status == 400
    assert problem in (await resp.json())["message"]


async def test_huge_top_n_is_all_results(bridge: TestClient) -> None:
    resp = await bridge.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"], "top_n": 2**40})
    assert resp.status == 200 and len((await resp.json())["results"]) == 2


# ---------------------------------------------------------------- operations


async def test_health_docs_openapi_and_root_redirect(bridge: TestClient) -> None:
    resp = await bridge.get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "SERVING"}
    resp = await bridge.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/docs"
    resp = await bridge.get("/docs")
    assert resp.status == 200 and "swagger-ui-bundle.js" in await resp.text()
    resp = await bridge.get("/docs/static/swagger-ui-bundle.js")
    assert resp.status == 200 and len(await resp.read()) > 100_000  # served from the installed package
    resp = await bridge.get("/openapi.json")
    doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    routes = {r.resource.canonical for r in bridge.app.router.routes() if r.resource is not None}
    assert routes - {"/docs/static"} <= set(doc["paths"])
