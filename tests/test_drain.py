"""A drain that ends when its work ends: SIGTERM with clients retrying every 0.2 s, a stream open, and a REST
client on a kept-alive connection, against a real `python -m server` process."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge import BridgeConfig, start_bridge
from rest_bridge.drain import drain_of
from server.app import SERVICE_NAME, RerankServer
from tests.load import is_whole, rerank_request
from tests.ops_helpers import free_port, sample, scrape
from tests.subprocess_server import ServerProcess

GRACE_S = 60  # the exit must come long before this: it is judged by the exit happening first, not by seconds
IN_FLIGHT = 3
RETRYING = 8
RETRY_EVERY_S = 0.2
MAX_ATTEMPTS = 300  # per retrying client: a bound, far above what the drain needs


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, dict, bytes]:
    """Send one request on an open connection; the status, headers (lower-case names) and body of its answer."""
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(head[0].split()[1]), headers, body


def _get_health(port: int) -> bytes:
    return f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def _post_rerank(port: int) -> bytes:
    body = json.dumps({"query": "what is panda?", "texts": ["a bear", "a car"]}).encode()
    head = f"POST /rerank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def _wait_queued(metrics_port: int, pairs: int, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while sample(scrape(metrics_port), "reranker_queue_pairs") < pairs:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.02)


async def _retrying(target: str, exited: asyncio.Event, outcomes: list[tuple[str, str]]) -> None:
    """Send a Rerank every 0.2 s until the server is gone; every outcome recorded."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        for i in range(MAX_ATTEMPTS):
            if exited.is_set():
                return
            try:
                await stub.Rerank(rerank_request(i), timeout=10)
                outcomes.append(("OK", ""))
            except grpc.aio.AioRpcError as exc:
                outcomes.append((exc.code().name, exc.details() or ""))
            await asyncio.sleep(RETRY_EVERY_S)


async def test_sigterm_exits_when_the_work_is_done_although_refused_clients_keep_retrying(
    model_dir: Path, tmp_path: Path
) -> None:
    metrics_port, rest_port = free_port(), free_port()
    # A batch that waits 5 s to fill keeps the first calls in flight while the signal lands.
    srv = ServerProcess(
        model_dir, tmp_path / "server.log", "--grace-s", str(GRACE_S), "--max-wait-ms", "5000",
        "--metrics-port", str(metrics_port), "--rest-port", str(rest_port),
    )  # fmt: skip
    exited = asyncio.Event()
    outcomes: list[tuple[str, str]] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", rest_port)
        status, headers, _ = await _http(reader, writer, _get_health(rest_port))
        assert status == 200 and headers.get("connection", "keep-alive").lower() != "close"  # kept alive
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.RerankerStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            requests = [rerank_request(1000 + i, candidates=1) for i in range(IN_FLIGHT)]
            in_flight = [asyncio.ensure_future(stub.Rerank(r, timeout=GRACE_S)) for r in requests]
            stream = stub.RerankStream(timeout=GRACE_S)
            await stream.write(pb.RerankRequest(request_id="s1", query="what is panda?", candidates=["a bear"]))
            await asyncio.to_thread(_wait_queued, metrics_port, IN_FLIGHT + 1)

            srv.terminate()
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING  # first
            with_retries = [asyncio.ensure_future(_retrying(srv.target, exited, outcomes)) for _ in range(RETRYING)]
            status, headers, body = await _http(reader, writer, _post_rerank(rest_port))  # the same connection
            assert status == 503 and headers["connection"].lower() == "close"
            assert "draining" in json.loads(body)["error"]
            with_notice = await stream.read()
            assert with_notice.HasField("draining")
            await stream.done_writing()
            answer = await stream.read()
            assert answer.request_id == "s1" and answer.HasField("response")

            exit_code = await asyncio.to_thread(srv.wait, GRACE_S - 15)  # fails if the drain takes the grace
            exited.set()
            await asyncio.wait_for(asyncio.gather(*with_retries), 30)
            answers = await asyncio.gather(*in_flight)
            assert all(is_whole(r, a) for r, a in zip(requests, answers, strict=True))  # 0 in-flight calls lost
            watch.cancel()
    finally:
        exited.set()
        writer.close()
        srv.stop()
    assert exit_code == 0
    # The refused callers got UNAVAILABLE: from the server ("draining"), or, once it was gone, from their channel.
    assert outcomes and {code for code, _ in outcomes} == {"UNAVAILABLE"}, outcomes
    assert any("draining" in message for _, message in outcomes)
    assert not any("Cancelling all calls" in message for _, message in outcomes)
    log = srv.log()
    assert "Traceback" not in log and "ERROR" not in log and "Exception not handled" not in log, log[-3000:]
    assert "stopped" in log


async def test_a_draining_bridge_answers_503_with_connection_close_while_its_calls_in_flight_finish(
    server: RerankServer,
) -> None:
    runner, port = await start_bridge(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}", host="127.0.0.1", port=0))
    drain = drain_of(runner)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, headers, _ = await _http(reader, writer, _get_health(port))
        assert status == 200 and headers.get("connection", "keep-alive").lower() != "close"
        drain.start()
        assert await drain.wait(5.0)  # nothing in flight
        for route, key in (("/rerank", "error"), ("/v1/rerank", "message")):  # each route's own error shape
            other_reader, other_writer = await asyncio.open_connection("127.0.0.1", port)
            request = _post_rerank(port).replace(b"POST /rerank ", f"POST {route} ".encode())
            status, headers, body = await _http(other_reader, other_writer, request)
            assert status == 503 and headers["connection"].lower() == "close"
            assert "draining" in json.loads(body)[key]
            other_writer.close()
        status, headers, body = await _http(reader, writer, _get_health(port))  # the kept-alive connection
        assert status == 503 and headers["connection"].lower() == "close"
        assert await reader.read() == b""  # and the bridge closed it
        writer.close()
    finally:
        await runner.cleanup()
