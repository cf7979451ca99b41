"""Published clients against a real bridge on a real port: the `cohere` SDK (v1 and v2) and `infinity-client`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
from infinity_client import Client as InfinityClient
from infinity_client.api.default import rerank as infinity_rerank
from infinity_client.models import RerankInput, ReRankResult

from rest_bridge import BridgeConfig, start_bridge
from tests.conftest import test_config
from tests.server_thread import ServerThread
from tests.test_bridge import PANDA, reference

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
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, abs=1e-6)
    assert resp.meta is not None and resp.meta.api_version is not None and resp.meta.api_version.version == "2"


def test_cohere_client_v1_with_objects_and_documents(url: str, flag_reranker: Any) -> None:
    docs: list[Any] = [{"text": d} for d in DOCS]
    with httpx.Client() as http:
        co = cohere.Client(base_url=url, api_key="unused", httpx_client=http)
        resp = co.rerank(model="rerank-english-v3.0", query=QUERY, documents=docs, top_n=3, return_documents=True)
    order, scores = best_first(flag_reranker, DOCS, 3)
    assert [r.index for r in resp.results] == order
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, abs=1e-6)
    assert [r.document.text for r in resp.results if r.document] == [DOCS[i] for i in order]


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
    assert [r.relevance_score for r in resp.results] == pytest.approx(scores, abs=1e-6)
    assert [r.document for r in resp.results] == [DOCS[i] for i in order]
    assert resp.usage.total_tokens > 0 and resp.model
