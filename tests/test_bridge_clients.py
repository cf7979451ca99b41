"""Published clients against a real bridge on a real port: the `cohere` SDK (v1 and v2), `infinity-client`,
`voyageai`, `mixedbread`, LangChain's NVIDIA integration (NIM's `/v1/ranking`) and vLLM's own example client
(the `cohere` SDK at its rerank API)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import mixedbread
import pytest
import voyageai
import voyageai.error
from infinity_client import Client as InfinityClient
from infinity_client.api.default import rerank as infinity_rerank
from infinity_client.models import RerankInput, ReRankResult
from langchain_core.documents import Document
from langchain_nvidia_ai_endpoints import NVIDIARerank
from mixedbread import Mixedbread

from rest_bridge import BridgeConfig, start_bridge
from tests.conftest import FP32_REORDERED, test_config
from tests.server_thread import ServerThread
from tests.test_bridge import PANDA, reference
from tests.test_chunking import LONG

QUERY = "what is panda?"
DOCS = ["hi", PANDA, "The quick brown fox jumps over the lazy dog.", "今天天气怎么样"]


@pytest.fixture(scope="module")
def url(model_dir: Path, engine: Any) -> Iterator[str]:
    thread = ServerThread(test_config(model_dir), engine)
    try:
        runner, port = thread.run(
            start_bridge(BridgeConfig(grpc_target=f"127.0.0.1:{thread.port}", host="127.0.0.1", port=0))
        )
        yield f"http://127.0.0.1:{port}"
        thread.run(runner.cleanup())
    finally:
        thread.stop()


def best_first(flag_reranker: Any, docs: list[str], top_n: int) -> tuple[list[int], list[float]]:
    want = reference(flag_reranker, [[QUERY, d] for d in docs], normalize=True)
    order = sorted(range(len(docs)), key=lambda i: -want[i])[:top_n]
    return order, [want[i] for i in order]


def test_cohere_client_v2(url: str, flag_reranker: Any) -> None:
    with httpx.Client() as http:
        co = cohere.ClientV2(base_url=url, api_key="unused", httpx_client=http)
        resp = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=2)
    order, scores = best_first(flag_reranker, DOCS, 2)
    assert [r.index for r in resp.results] == order
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, **FP32_REORDERED)
    assert resp.meta is not None and resp.meta.api_version is not None and resp.meta.api_version.version == "2"


def test_cohere_client_v1_with_objects_and_documents(url: str, flag_reranker: Any) -> None:
    docs: list[Any] = [{"text": d} for d in DOCS]
    with httpx.Client() as http:
        co = cohere.Client(base_url=url, api_key="unused", httpx_client=http)
        resp = co.rerank(model="rerank-english-v3.0", query=QUERY, documents=docs, top_n=3, return_documents=True)
    order, scores = best_first(flag_reranker, DOCS, 3)
    assert [r.index for r in resp.results] == order
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, **FP32_REORDERED)
    assert [r.document.text for r in resp.results if r.document] == [DOCS[i] for i in order]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_vllms_own_example_client_on_the_vllm_dialect(url: str, flag_reranker: Any, version: str) -> None:
    """vLLM documents its rerank API through the Cohere SDK (examples/online_serving/cohere_rerank_client.py:
    `cohere.Client` and `cohere.ClientV2` with base_url at the vLLM server): here at the bridge's /vllm prefix, so
    the SDK posts to /vllm/v1/rerank and /vllm/v2/rerank and parses vLLM's answer (id, model, usage, results)."""
    with httpx.Client() as http:
        if version == "v1":
            co: Any = cohere.Client(base_url=f"{url}/vllm", api_key="sk-fake-key", httpx_client=http)
        else:
            co = cohere.ClientV2("sk-fake-key", base_url=f"{url}/vllm", httpx_client=http)
        resp = co.rerank(model="BAAI/bge-reranker-base", query=QUERY, documents=DOCS)
    order, scores = best_first(flag_reranker, DOCS, len(DOCS))  # vLLM's default: sigmoid scores, all, best first
    assert [r.index for r in resp.results] == order
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, **FP32_REORDERED)
    assert resp.id  # vLLM's answer has an id (our request id), which Cohere's parses


def test_cohere_client_sees_our_error_message(url: str) -> None:
    with httpx.Client() as http:
        co = cohere.ClientV2(base_url=url, api_key="unused", httpx_client=http)
        with pytest.raises(cohere.BadRequestError) as err:
            co.rerank(model="rerank-v3.5", query=QUERY, documents=[], top_n=1)
    assert err.value.status_code == 400 and err.value.body == {"message": "documents is empty; send at least one text"}


def test_infinity_client(url: str, flag_reranker: Any) -> None:
    client = InfinityClient(base_url=url, raise_on_unexpected_status=True)
    with client:
        body = RerankInput(query=QUERY, documents=DOCS, return_documents=True, top_n=2)
        resp = infinity_rerank.sync(client=client, body=body)
    assert isinstance(resp, ReRankResult)
    order, scores = best_first(flag_reranker, DOCS, 2)
    assert [r.index for r in resp.results] == order
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, **FP32_REORDERED)
    assert [r.document for r in resp.results] == [DOCS[i] for i in order]
    assert resp.usage.total_tokens > 0 and resp.model


@pytest.mark.parametrize("base", ["/v1", "", "/voyage/v1"])  # /v1/rerank and /rerank are shared; /voyage/v1 is its own
def test_voyage_client(url: str, flag_reranker: Any, base: str) -> None:
    vo = voyageai.Client(api_key="unused", base_url=url + base, max_retries=0)
    resp = vo.rerank(QUERY, DOCS, model="rerank-2.5", top_k=2)
    order, scores = best_first(flag_reranker, DOCS, 2)
    assert [r.index for r in resp.results] == order  # top_k honoured: only the best two come back
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, **FP32_REORDERED)
    assert [r.document for r in resp.results] == [DOCS[i] for i in order] and resp.total_tokens > 0


def test_voyage_client_truncation_false_and_its_error(url: str) -> None:
    vo = voyageai.Client(api_key="unused", base_url=url + "/v1", max_retries=0)
    with pytest.raises(voyageai.error.InvalidRequestError) as err:
        vo.rerank(QUERY, ["hi", LONG[0]], model="rerank-2.5", truncation=False)
    assert "document at index 1 together exceed the context length of 512 tokens" in str(err.value)
    assert err.value.http_status == 400
    assert len(vo.rerank(QUERY, ["hi", LONG[0]], model="rerank-2.5").results) == 2  # truncation: true (its default)


def test_mixedbread_client(url: str, flag_reranker: Any) -> None:
    mx = Mixedbread(api_key="unused", base_url=url, max_retries=0)
    inputs: list[Any] = [{"title": "Greeting", "text": DOCS[0]}, *DOCS[1:]]
    resp = mx.rerank(model="mixedbread-ai/mxbai-rerank-large-v2", query=QUERY, input=inputs, top_k=3, return_input=True)
    order, scores = best_first(flag_reranker, DOCS, 3)
    assert [d.index for d in resp.data] == order and resp.top_k == 3 and resp.return_input is True
    assert [d.score for d in resp.data] == pytest.approx(scores, **FP32_REORDERED)
    assert [d.input for d in resp.data] == [inputs[i] for i in order] and resp.usage.total_tokens > 0
    with pytest.raises(mixedbread.BadRequestError) as err:
        mx.rerank(query=QUERY, input=[{"title": "no text"}])
    assert err.value.status_code == 400 and err.value.body == {"detail": 'input[0] is an object without "text"'}


def test_nvidia_langchain_client_on_the_nim_ranking_api(url: str, flag_reranker: Any) -> None:
    """NVIDIARerank with a self-hosted base_url posts NIM's `{model, query: {text}, passages: [{text}], truncate}`
    to /v1/ranking and reads `rankings[].logit`: raw scores, best first, its top_n kept."""
    rerank = NVIDIARerank(base_url=f"{url}/v1", model="nvidia/llama-3.2-nv-rerankqa-1b-v2", top_n=2, truncate="END")
    docs = [*DOCS, LONG[0]]  # the long one is cut (truncate END), not refused
    out = rerank.compress_documents(documents=[Document(page_content=d) for d in docs], query=QUERY)
    raw = reference(flag_reranker, [[QUERY, d] for d in DOCS], normalize=False)
    assert len(out) == 2 and all(d.page_content in docs for d in out)
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True)
    for d in out:
        if d.page_content in DOCS:
            assert d.metadata["relevance_score"] == pytest.approx(raw[DOCS.index(d.page_content)], **FP32_REORDERED)
