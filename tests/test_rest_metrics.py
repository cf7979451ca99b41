"""REST metrics: each request counted by route, dialect, HTTP status and outcome, timed by route, in the server's
registry (legacy 1's HTTP 200 failures counted as errors)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from rest_bridge import BridgeConfig, create_app
from server.app import RerankServer

PAIRS = "[['what is panda?', 'hi'], ['what is panda?', 'a bear']]"
# (method, path, body, HTTP status, route, dialect, outcome)
CALLS = [
    ("POST", "/bge-reranker-base/post", {"text_pairs": PAIRS}, 200, "/bge-reranker-base/post", "legacy 1", "ok"),
    (
        "POST",
        "/bge-reranker-base/post",
        {"text_pairs": "[['q'"},
        200,
        "/bge-reranker-base/post",
        "legacy 1",
        "client_error",
    ),
    ("POST", "/rerank", {"query": "q", "compare_to": ["a", "b"]}, 200, "/rerank", "legacy 2", "ok"),
    ("POST", "/reank", {"query": "q", "compare_to": ["a"]}, 200, "/reank", "legacy 2", "ok"),
    ("POST", "/rerank", {"query": "q", "texts": ["a", "b"]}, 200, "/rerank", "TEI", "ok"),
    ("POST", "/rerank", {"query": "q", "documents": ["a"], "top_n": "x"}, 400, "/rerank", "Infinity", "client_error"),
    ("POST", "/rerank", {"query": "q"}, 400, "/rerank", "none", "client_error"),  # no dialect's list
    ("POST", "/v1/rerank", "not json", 400, "/v1/rerank", "Cohere v1", "client_error"),  # known by its route
    ("POST", "/v2/rerank", {"model": "m", "query": "q", "documents": ["a"]}, 200, "/v2/rerank", "Cohere v2", "ok"),
    ("GET", "/info", None, 200, "/info", "TEI", "ok"),
    ("GET", "/health", None, 200, "/health", "none", "ok"),
    ("GET", "/no/such/route", None, 404, "unmatched", "none", "client_error"),
]


@pytest.fixture
async def counted(server: RerankServer, aiohttp_client: Any) -> tuple[TestClient, CollectorRegistry]:
    registry = server.metrics.registry  # as `python -m server --rest-port` joins them
    app = create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}"), registry)
    return await aiohttp_client(app), registry


async def test_each_request_is_counted_by_route_dialect_status_and_outcome(
    counted: tuple[TestClient, CollectorRegistry],
) -> None:
    client, registry = counted
    for method, path, body, status, *_ in CALLS:
        data = body if isinstance(body, str) else None
        resp = await client.request(method, path, json=None if data else body, data=data)
        assert resp.status == status, (path, await resp.text())
    expected: dict[tuple[str, str, str, str], int] = {}
    for _, _, _, status, route, dialect, outcome in CALLS:
        key = (route, dialect, str(status), outcome)
        expected[key] = expected.get(key, 0) + 1
    for (route, dialect, status, outcome), count in expected.items():
        labels = {"route": route, "dialect": dialect, "status": status, "outcome": outcome}
        assert registry.get_sample_value("reranker_rest_requests_total", labels) == count, labels
    for route in {c[4] for c in CALLS}:
        timed = registry.get_sample_value("reranker_rest_request_seconds_count", {"route": route})
        assert timed == sum(1 for c in CALLS if c[4] == route), route
    # The gRPC side counts its own calls in the same registry, as before.
    assert registry.get_sample_value("reranker_requests_total", {"method": "Rerank", "code": "OK"})


async def test_the_failures_of_the_server_are_server_errors(server: RerankServer, aiohttp_client: Any) -> None:
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target="127.0.0.1:1", deadline_s=2), registry))
    resp = await client.post("/bge-reranker-base/post", json={"text_pairs": PAIRS})
    assert resp.status == 503 and (await resp.json())["code"] == -1  # the envelope, with its real status
    labels = {"route": "/bge-reranker-base/post", "dialect": "legacy 1", "status": "503", "outcome": "server_error"}
    assert registry.get_sample_value("reranker_rest_requests_total", labels) == 1
