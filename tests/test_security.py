"""API key, TLS and mutual TLS on the real server, with certificates made in the test."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import AsyncRerankerClient, AuthenticationError, RerankerClient, RerankerError, Retry, StreamRequest
from server.app import RerankServer
from server.config import Config, ConfigError, load_config
from tests.conftest import test_config
from tests.pki import Pki

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda is a bear species endemic to China."]
KEY = "s3cret-key"
NO_RETRY = Retry(max_attempts=1)


@pytest.fixture
async def serve(model_dir: Path, engine: Any) -> AsyncIterator[Any]:
    started: list[RerankServer] = []

    async def start(**overrides: Any) -> RerankServer:
        srv = RerankServer(test_config(model_dir, **overrides), engine=engine)
        await srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop(0)


async def test_api_key_guards_the_reranker_but_not_health_or_reflection(serve: Any) -> None:
    srv = await serve(api_key=KEY)
    target = f"127.0.0.1:{srv.port}"
    for key in (None, "wrong", KEY + "x", "", KEY.upper()):
        async with AsyncRerankerClient(target, api_key=key, retry=NO_RETRY) as client:
            with pytest.raises(AuthenticationError) as err:
                await client.rerank(QUERY, CANDIDATES)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in err.value.message
            with pytest.raises(AuthenticationError):
                await client.model_info()
    async with AsyncRerankerClient(target, api_key=KEY) as client:
        assert len((await client.rerank(QUERY, CANDIDATES)).scores) == 2
        assert (await client.model_info()).model == srv.config.default_model
    async with AsyncRerankerClient(target) as client:  # no key: health still answers
        assert await client.health() == "SERVING"
    async with grpc.aio.insecure_channel(target) as ch:
        assert (
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert (await call.read()).list_services_response.service
        await call.done_writing()
    assert (
        srv.metrics.registry.get_sample_value(
            "reranker_requests_total", {"method": "Rerank", "code": "UNAUTHENTICATED"}
        )
        == 5
    )


async def test_tls_with_api_key(serve: Any, pki: Pki) -> None:
    srv = await serve(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), api_key=KEY)
    target = f"127.0.0.1:{srv.port}"
    ca = pki.ca.read_bytes()
    async with AsyncRerankerClient(target, root_certificates=ca, tls_server_name="localhost", api_key=KEY) as client:
        assert len((await client.rerank(QUERY, CANDIDATES)).scores) == 2
    async with AsyncRerankerClient(target, root_certificates=ca, api_key=KEY) as client:  # the IP is in the SAN too
        assert (await client.model_info()).model == srv.config.default_model
    async with AsyncRerankerClient(target, api_key=KEY, retry=NO_RETRY, timeout=5) as client:  # plaintext
        with pytest.raises(RerankerError) as err:
            await client.model_info()
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_mutual_tls_needs_a_client_certificate(serve: Any, pki: Pki) -> None:
    srv = await serve(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    target, ca = f"localhost:{srv.port}", pki.ca.read_bytes()
    cert, key = pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    async with AsyncRerankerClient(target, root_certificates=ca, tls_client_cert=cert, tls_client_key=key) as client:
        assert (await client.model_info()).model == srv.config.default_model
        (answer,) = [a async for a in client.rerank_stream([StreamRequest(query=QUERY, candidates=CANDIDATES)])]
        assert answer.ok
    async with AsyncRerankerClient(target, root_certificates=ca, retry=NO_RETRY, timeout=5) as client:
        with pytest.raises(RerankerError) as err:  # no client certificate: the handshake fails
            await client.model_info()
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with RerankerClient(target, root_certificates=ca, tls_client_cert=cert, tls_client_key=key) as blocking:
        assert len((await asyncio.to_thread(blocking.rerank, QUERY, CANDIDATES)).scores) == 2  # still serving


def test_client_certificate_options_are_checked(pki: Pki) -> None:
    cert = pki.client_cert.read_bytes()
    with pytest.raises(ValueError, match="needs both tls_client_cert and tls_client_key"):
        RerankerClient("localhost:1", tls_client_cert=cert)
    with pytest.raises(ValueError, match="tls_client_cert must be PEM bytes"):
        RerankerClient("localhost:1", tls_client_cert=str(pki.client_cert), tls_client_key=b"x")  # type: ignore[arg-type]


def test_security_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    with pytest.raises(ConfigError, match="--tls-cert is set but --tls-key is not"):
        Config(tls_cert=cert)
    with pytest.raises(ConfigError, match="--tls-key is set but --tls-cert is not"):
        Config(tls_key=key)
    with pytest.raises(ConfigError, match="--tls-client-ca .* needs --tls-cert"):
        Config(tls_client_ca=ca)
    with pytest.raises(ConfigError, match="--tls-key .*missing.pem.*: no such file"):
        Config(tls_cert=cert, tls_key=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="api_key must be printable ASCII"):
        Config(api_key=" spaced ")
    assert KEY not in repr(Config(api_key=KEY))  # never shows up in a log of the config


def test_operations_settings_come_from_flags_and_environment(pki: Pki) -> None:
    env = {
        "RERANKER_API_KEY": KEY,
        "RERANKER_LOG_JSON": "yes",
        "RERANKER_METRICS_PORT": "9100",
        "RERANKER_MAX_CONCURRENT_RPCS": "64",
        "RERANKER_TLS_CERT": str(pki.server_cert),
        "RERANKER_TLS_KEY": str(pki.server_key),
    }
    c = load_config([], env=env)
    assert (c.api_key, c.log_json, c.metrics_port, c.max_concurrent_rpcs, c.tls) == (KEY, True, 9100, 64, True)
    c = load_config(["--no-log-json", "--metrics-port", "0", "--api-key", "other"], env=env)
    assert (c.log_json, c.metrics_port, c.api_key) == (False, 0, "other")
    for word, value in (("1", True), ("on", True), ("0", False), ("off", False), ("FALSE", False)):
        assert load_config([], env={"RERANKER_LOG_JSON": word}).log_json is value
    with pytest.raises(ConfigError, match="RERANKER_LOG_JSON='maybe'.*1/true/yes/on"):
        load_config([], env={"RERANKER_LOG_JSON": "maybe"})
    with pytest.raises(ConfigError, match="metrics_port and port are both"):
        Config(port=9000, metrics_port=9000)
    with pytest.raises(ConfigError, match="max_concurrent_rpcs must be"):
        Config(max_concurrent_rpcs=-1)
    assert Config(rest_port=6009, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)).tls  # HTTPS bridge
    with pytest.raises(ConfigError, match="max_connections must be positive"):
        Config(max_connections=0)
    with pytest.raises(ConfigError, match="max_connection_idle_s must be 0 .never. or positive"):
        Config(max_connection_idle_s=-1)
    with pytest.raises(ConfigError, match="log_level must be one of DEBUG, INFO"):
        Config(log_level="LOUD")
    assert Config(log_level="debug").log_level == "debug"


def test_a_file_that_is_not_a_certificate_stops_startup_with_a_clear_message(pki: Pki, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--model", str(tmp_path)]
        + ["--tls-cert", str(bogus), "--tls-key", str(pki.server_key)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot start: --tls-cert" in proc.stderr and "is not a PEM file with a CERTIFICATE" in proc.stderr


async def test_bridge_turns_a_missing_api_key_into_401(serve: Any, aiohttp_client: Any) -> None:
    from rest_bridge import BridgeConfig, create_app

    srv = await serve(api_key=KEY)
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{srv.port}")))
    body = {"query": QUERY, "documents": CANDIDATES}
    assert (await bridge.post("/v1/rerank", json=body)).status == 401
    assert (await bridge.post("/v1/rerank", json=body, headers={"Authorization": "Bearer nope"})).status == 401
    resp = await bridge.post("/v1/rerank", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status == 200 and len((await resp.json())["results"]) == 2
