"""gRPC status -> HTTP status, forwarded metadata, deadlines, and the bridge riding out a server restart."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge import BridgeConfig, create_app
from rest_bridge.errors import CONFIG_KEY
from server.app import RerankServer
from tests.conftest import test_config
from tests.test_bridge_process import free_port


class ScriptedReranker(pb_grpc.RerankerServicer):
    """Answers every Rerank with a chosen status (or after a delay) and records the metadata it got."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK
        self.delay_s = 0.0
        self.metadata: dict[str, str] = {}

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        self.metadata = {k: v for k, v in context.invocation_metadata() or ()}
        await asyncio.sleep(self.delay_s)
        if self.code != grpc.StatusCode.OK:
            await context.abort(self.code, f"scripted {self.code.name}")
        return pb.RerankResponse(scores=[0.5] * len(request.candidates), model="scripted")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedReranker, int]]:
    servicer = ScriptedReranker()
    server = grpc.aio.server()
    pb_grpc.add_RerankerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


@pytest.mark.parametrize(
    ("code", "http"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.INTERNAL, 502),
        (grpc.StatusCode.UNIMPLEMENTED, 502),
    ],
)
async def test_grpc_status_maps_to_http(
    scripted: tuple[ScriptedReranker, int], aiohttp_client: Any, code: grpc.StatusCode, http: int
) -> None:
    servicer, port = scripted
    servicer.code = code
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{port}")))
    resp = await client.post("/rerank", json={"query": "q", "compare_to": ["a"]})
    assert resp.status == http
    body = await resp.json()
    said = "Authorization: Bearer" if http == 401 else "scripted"  # HTTP callers send a header, not metadata
    assert body["status"] == http and said in body["error"] and "Traceback" not in body["error"]
    resp = await client.post("/bge-reranker-base/post", json={"text_pairs": [["q", "a"]]})
    body = await resp.json()
    assert resp.status == (200 if http == 400 else http)  # legacy 1 keeps its envelope either way
    assert body["code"] == -1 and body["rerank_scores"] == [] and said in body["error"]


async def test_authorization_and_request_id_are_forwarded(
    scripted: tuple[ScriptedReranker, int], aiohttp_client: Any
) -> None:
    servicer, port = scripted
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{port}")))
    headers = {"Authorization": "Bearer s3cret", "X-Request-Id": "abc-123"}
    resp = await client.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=headers)
    assert resp.status == 200
    assert servicer.metadata["authorization"] == "Bearer s3cret"
    assert servicer.metadata["x-request-id"] == "abc-123"


async def test_slow_server_gets_504_after_the_deadline(
    scripted: tuple[ScriptedReranker, int], aiohttp_client: Any
) -> None:
    servicer, port = scripted
    servicer.delay_s = 2.0
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{port}", deadline_s=0.2)))
    resp = await client.post("/rerank", json={"query": "q", "compare_to": ["a"]})
    error = (await resp.json())["error"]
    assert resp.status == 504 and "DEADLINE_EXCEEDED" in error
    assert "waits at most 0.2 s" in error and "RERANKER_REST_DEADLINE_S" in error and "--rest-deadline-s" in error


async def test_server_rest_port_bridge_takes_the_shared_deadline_setting(model_dir: Path) -> None:
    from server.__main__ import _start_bridge
    from server.config import load_config

    config = load_config(["--model", str(model_dir), "--rest-port", "0"], {"RERANKER_REST_DEADLINE_S": "45"})
    assert config.rest_deadline_s == 45.0  # the same variable as python -m rest_bridge's --deadline-s
    config = dataclasses.replace(config, host="127.0.0.1", rest_port=free_port())
    runner = await _start_bridge(config, grpc_target=f"127.0.0.1:{free_port()}")
    try:
        assert runner.app[CONFIG_KEY].deadline_s == 45.0
    finally:
        await runner.cleanup()


async def _status_until(client: TestClient, path: str, want: int, body: dict[str, Any] | None = None) -> int:
    """Poll until `path` answers `want` (at most ~10 s); returns the last status."""
    status = 0
    for _ in range(100):
        resp = await (client.post(path, json=body) if body is not None else client.get(path))
        status = resp.status
        if status == want:
            break
        await asyncio.sleep(0.1)
    return status


async def test_server_stopped_503_then_restarted_on_the_same_port_200(
    model_dir: Path, engine: Any, aiohttp_client: Any
) -> None:
    srv = RerankServer(test_config(model_dir), engine=engine)
    port = await srv.start()
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{port}")))
    request = {"query": "what is panda?", "compare_to": ["hi"]}
    assert (await client.post("/rerank", json=request)).status == 200
    await srv.stop(0)
    resp = await client.post("/rerank", json=request)
    assert resp.status == 503
    assert "cannot be reached or is not ready" in (await resp.json())["error"]
    assert (await client.get("/health")).status == 503
    srv = RerankServer(test_config(model_dir, port=port), engine=engine)
    await srv.start()
    try:
        assert await _status_until(client, "/rerank", 200, request) == 200  # the same channel reconnects
        assert (await client.get("/health")).status == 200
    finally:
        await srv.stop(0)


async def test_health_follows_the_server(model_dir: Path, engine: Any, aiohttp_client: Any) -> None:
    srv = RerankServer(test_config(model_dir), engine=engine)
    port = await srv.bind()
    client = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{port}")))
    resp = await client.get("/health")
    assert resp.status == 503 and await resp.json() == {"status": "NOT_SERVING"}  # model loading
    await srv.load()
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "SERVING"}
    await srv.stop(0)
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] in ("NOT_SERVING", "UNAVAILABLE")


async def _raw(port: int, request: bytes, then: bytes = b"") -> tuple[bytes, bytes]:
    """Send `request` (and `then` once the server is reading), return the answer's status line and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        if then:
            assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"HTTP/1.1 100 ")
            await asyncio.wait_for(reader.readline(), 30)  # the blank line after it
            writer.write(then)
        status = await asyncio.wait_for(reader.readline(), 30)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
        return status, await asyncio.wait_for(reader.readexactly(length), 30)
    finally:
        writer.close()


async def test_a_body_that_stops_arriving_is_a_408(scripted: tuple[ScriptedReranker, int], aiohttp_client: Any) -> None:
    _, port = scripted
    config = BridgeConfig(grpc_target=f"127.0.0.1:{port}", body_timeout_s=0.5)
    client: TestClient = await aiohttp_client(create_app(config))
    head = b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    status, body = await _raw(client.port, head, then=b'{"query": ')  # ... and the other 90 bytes never come
    assert status.startswith(b"HTTP/1.1 408 ")
    assert b"the request body did not arrive within 0.5 s (--rest-body-timeout-s)" in body


@pytest.mark.parametrize("header", ["X-Request-Id", "Authorization"])
async def test_a_non_ascii_forwarded_header_is_a_400_before_calling_grpc(
    scripted: tuple[ScriptedReranker, int], aiohttp_client: Any, header: str
) -> None:
    servicer, port = scripted
    client: TestClient = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{port}")))
    body = b'{"query": "q", "compare_to": ["a"]}'
    request = (
        b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"{header}: caf\u00e9-1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, answer = await _raw(client.port, request)
    assert status.startswith(b"HTTP/1.1 400 ")
    assert f"the {header.lower()} header must be printable ASCII".encode() in answer
    assert servicer.metadata == {}  # never forwarded
