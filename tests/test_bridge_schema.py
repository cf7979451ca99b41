"""Property-based run of schemathesis against the bridge's own /openapi.json: no 5xx, every answer as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks

from rest_bridge import BridgeConfig, start_bridge
from rest_bridge.openapi import OPENAPI
from tests.conftest import test_config
from tests.server_thread import ServerThread

CHECKS = [
    schemathesis.checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def bridge_url(model_dir: Path, engine: Any) -> Iterator[str]:
    thread = ServerThread(test_config(model_dir), engine)  # gRPC server and bridge share its event loop
    try:
        config = BridgeConfig(grpc_target=f"127.0.0.1:{thread.port}", host="127.0.0.1", port=0)
        runner, port = thread.run(start_bridge(config))
        yield f"http://127.0.0.1:{port}"
        thread.run(runner.cleanup())
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def api_schema(bridge_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{bridge_url}/openapi.json")
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])
    return schema


OPERATIONS = [(method, path) for path, item in OPENAPI["paths"].items() for method in item]


# schemathesis.pytest.from_fixture does not run under pytest 9, so each operation gets a plain Hypothesis run.
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_matches_its_schema(api_schema: Any, bridge_url: str, method: str, path: str) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=bridge_url, checks=CHECKS, timeout=30)

    run()


LONG_TEXT = " ".join(f"({i}) The giant panda is a bear species endemic to China." for i in range(120))
# One real request per dialect and option, so every answer shape is checked against the document, not only
# those Hypothesis happens to generate.
DIALECT_BODIES = [
    ("/bge-reranker-base/post", {"text_pairs": "[['what is panda?', 'hi']]"}),
    ("/bge-reranker-base/post", {"text_pairs": "[['what is panda?', 'hi']"}),  # the failure envelope
    ("/rerank", {"query": "什么是函数计算", "compare_to": ["你好", "今天天气怎么样"]}),
    ("/rerank", {"query": "q", "texts": ["a", LONG_TEXT], "return_text": True, "raw_scores": True}),
    ("/rerank", {"query": "q", "documents": ["a", "b", "c"], "return_documents": True, "top_n": 2}),
    ("/rerank", {"query": "q", "documents": ["a", "b"]}),
    ("/rerank", {"query": "q"}),  # 400 naming the three dialects
    ("/v1/rerank", {"query": "q", "documents": [{"title": "t", "text": "a"}, "b"], "return_documents": True}),
    ("/v1/rerank", {"query": "q", "documents": ["a", LONG_TEXT], "max_chunks_per_doc": 10, "top_n": 1}),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "t"}], "rank_fields": ["text"]}),  # Cohere's error shape
    ("/v2/rerank", {"model": "rerank-v3.5", "query": "q", "documents": ["a", LONG_TEXT], "top_n": 1}),
    ("/rerank", {"query": "q", "texts": ["a", LONG_TEXT], "truncate": False}),  # 413, TEI's refusal
    ("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "truncate_prompt_tokens": -1}),
    ("/vllm/v2/rerank", {"query": "q", "documents": ["a", LONG_TEXT], "return_documents": False}),  # vLLM's error
    ("/score", {"queries": "q", "documents": ["a", "b"], "use_activation": False}),
    ("/vllm/v1/score", {"text_1": ["q", "r"], "text_2": ["a"]}),  # 1:N or N:N only
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"], "top_k": 1, "return_documents": True, "truncation": True}),
    ("/voyage/v1/rerank", {"query": "q", "documents": ["a", LONG_TEXT], "truncation": False}),
    ("/v1/reranking", {"query": "q", "input": [{"text": "a"}, "b"], "top_k": 1, "return_input": True}),
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}, {"text": LONG_TEXT}], "truncate": "END"}),
    ("/v1/retrieval/{model}/reranking", {"query": {"text": "q"}, "passages": [{"text": LONG_TEXT}]}),  # NIM's 400
]


@pytest.mark.parametrize(("path", "body"), DIALECT_BODIES)
def test_each_dialect_answers_as_documented(api_schema: Any, bridge_url: str, path: str, body: Any) -> None:
    params = {"model": "nvidia/nv-rerankqa-mistral-4b-v3"} if "{model}" in path else None
    case = api_schema[path]["POST"].Case(body=body, media_type="application/json", path_parameters=params)
    case.call_and_validate(base_url=bridge_url, checks=CHECKS, timeout=30)


def test_info_answers_as_documented(api_schema: Any, bridge_url: str) -> None:
    api_schema["/info"]["GET"].Case().call_and_validate(base_url=bridge_url, checks=CHECKS, timeout=30)
