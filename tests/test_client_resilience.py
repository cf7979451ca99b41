"""The client across a server restart, over two replicas (round_robin), with an API key and with TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import AsyncRerankerClient, AuthenticationError, RerankerError, Retry
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from tests.conftest import test_config
from tests.pki import Pki

QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda is a bear species endemic to China."]


async def test_a_call_retries_across_a_server_restart_on_the_same_port(
    model_dir: Path, engine: Any, server: RerankServer
) -> None:
    port = server.port
    # Slow backoff: the call keeps retrying for seconds, well past the restart below.
    retry = Retry(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=2.0)
    async with AsyncRerankerClient(f"127.0.0.1:{port}", retry=retry, timeout=30) as client:
        assert (await client.rerank(QUERY, CANDIDATES)).scores
        await server.stop(0)
        call = asyncio.ensure_future(client.rerank(QUERY, CANDIDATES))  # fails UNAVAILABLE and retries
        new = RerankServer(test_config(model_dir, port=port), engine=engine)
        attempts = 0
        reached = asyncio.Event()
        not_ready = new.service._ready

        def spy(name: str = "") -> Any:  # counts attempts that reach the new server before its model is ready
            nonlocal attempts
            attempts += 1
            reached.set()
            return not_ready(name)

        new.service._ready = spy  # type: ignore[method-assign]
        assert await new.bind() == port
        try:
            await asyncio.wait_for(reached.wait(), 30)  # a retry arrived while the new server was loading
            assert not call.done()
            await new.load()
            result = await call
            assert len(result.scores) == len(CANDIDATES)
            assert attempts >= 2  # refused while loading (UNAVAILABLE), then answered
        finally:
            await new.stop(0)


@pytest.fixture
async def second_server(model_dir: Path, engine: Any) -> AsyncIterator[RerankServer]:
    srv = RerankServer(test_config(model_dir), engine=engine)
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_round_robin_spreads_calls_over_two_servers(server: RerankServer, second_server: RerankServer) -> None:
    targets = [f"127.0.0.1:{server.port}", f"127.0.0.1:{second_server.port}"]
    async with AsyncRerankerClient(targets) as client:
        assert client.target == f"ipv4:{targets[0]},{targets[1]}"
        await client.wait_until_ready(timeout=30)
        calls = 20
        for _ in range(calls):
            await client.rerank(QUERY, CANDIDATES)
    served = []
    for srv in (server, second_server):
        assert srv.batcher() is not None
        served.append(srv.batcher().stats.pairs // len(CANDIDATES))
    assert sum(served) == calls
    assert min(served) >= 1, f"requests served per server: {served}"


class KeyChecking(pb_grpc.RerankerServicer):
    """A stand-in server that enforces an API key, as the real one will."""

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> Any:
        if dict(context.invocation_metadata()).get("authorization") != "Bearer s3cret":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        return pb.GetModelInfoResponse(model="keyed")


async def _key_checking_server(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    srv = grpc.aio.server()
    pb_grpc.add_RerankerServicer_to_server(KeyChecking(), srv)
    if credentials is None:
        port = srv.add_insecure_port("127.0.0.1:0")
    else:
        port = srv.add_secure_port("127.0.0.1:0", credentials)
    await srv.start()
    return srv, port


async def test_api_key_is_sent_as_bearer_metadata() -> None:
    srv, port = await _key_checking_server()
    try:
        async with AsyncRerankerClient(f"127.0.0.1:{port}", api_key="s3cret") as client:
            assert (await client.model_info()).model == "keyed"
        async with AsyncRerankerClient(f"127.0.0.1:{port}", api_key="wrong") as client:
            with pytest.raises(AuthenticationError) as err:
                await client.model_info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.message == "missing or wrong API key"
    finally:
        await srv.stop(0)


async def test_tls_with_root_certificates_and_api_key(pki: Pki) -> None:
    key, cert = pki.server_key.read_bytes(), pki.server_cert.read_bytes()
    credentials = grpc.ssl_server_credentials([(key, cert)])
    srv, port = await _key_checking_server(credentials)
    try:
        async with AsyncRerankerClient(
            f"127.0.0.1:{port}", root_certificates=pki.ca.read_bytes(), tls_server_name="localhost", api_key="s3cret"
        ) as client:
            assert (await client.model_info()).model == "keyed"
        # The same server refuses a plaintext client.
        async with AsyncRerankerClient(f"127.0.0.1:{port}", retry=Retry(max_attempts=1), timeout=5) as client:
            with pytest.raises(RerankerError) as err:
                await client.model_info()
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await srv.stop(0)
