"""TLS end to end: gRPC and the in-process REST bridge over (mutual) TLS, the bridge's TLS upstream, the probe."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from clients import RerankerClient
from rest_bridge import BridgeConfig, create_app
from rest_bridge.config import load_bridge_config
from server import healthcheck
from server.app import RerankServer
from tests.conftest import FP32_REORDERED, test_config
from tests.ops_helpers import free_port
from tests.pki import Pki
from tests.subprocess_server import ServerProcess

QUERY, CANDIDATES = "what is panda?", ["hi", "The giant panda is a bear species endemic to China."]


def _https_post(url: str, body: dict[str, Any], context: ssl.SSLContext) -> tuple[int, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30, context=context) as resp:
        return resp.status, json.loads(resp.read())


def test_rest_port_with_mutual_tls_serves_both_and_the_probe_passes(model_dir: Path, pki: Pki, tmp_path: Path) -> None:
    rest_port = free_port()
    client_tls = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    srv = ServerProcess(
        model_dir,
        tmp_path / "server.log",
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)),
        *("--rest-port", str(rest_port), "--threads", "1"),
        credentials=healthcheck.credentials(str(pki.ca), str(pki.client_cert), str(pki.client_key)),
    )
    try:
        cert, key, ca = pki.client_cert.read_bytes(), pki.client_key.read_bytes(), pki.ca.read_bytes()
        with RerankerClient(srv.target, root_certificates=ca, tls_client_cert=cert, tls_client_key=key) as client:
            scores = client.rerank(QUERY, CANDIDATES, normalize=True).scores  # /v1/rerank answers sigmoid scores
        https = ssl.create_default_context(cafile=str(pki.ca))
        https.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        url = f"https://127.0.0.1:{rest_port}/v1/rerank"
        status, body = _https_post(url, {"query": QUERY, "documents": CANDIDATES}, https)
        assert status == 200
        by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
        assert [by_index[0], by_index[1]] == pytest.approx(scores, **FP32_REORDERED)

        no_cert = ssl.create_default_context(cafile=str(pki.ca))  # mutual TLS: no certificate, no answer
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https_post(url, {"query": QUERY, "documents": CANDIDATES}, no_cert)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the HTTPS port
            urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/health", timeout=10)

        env_target = ("--target", srv.target)
        assert healthcheck.main([*env_target, *client_tls, "--service", "reranker.v1.Reranker"]) == 0
        assert healthcheck.main([*env_target, "--tls-ca", str(pki.ca)]) == 1  # no client certificate
        assert healthcheck.main([*env_target]) == 1  # plaintext against TLS
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


async def test_standalone_bridge_calls_grpc_over_mutual_tls(
    model_dir: Path, engine: Any, pki: Pki, aiohttp_client: Any, flag_reranker: Any
) -> None:
    srv = RerankServer(
        test_config(model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)),
        engine=engine,
    )
    await srv.start()
    try:
        argv = ["--grpc-target", f"127.0.0.1:{srv.port}", "--grpc-ca", str(pki.ca), "--grpc-server-name", "localhost"]
        argv += ["--grpc-cert", str(pki.client_cert), "--grpc-key", str(pki.client_key), "--port", "0"]
        config = load_bridge_config(argv, env={})
        assert (config.grpc_ca, config.grpc_cert, config.grpc_key) == (
            str(pki.ca),
            str(pki.client_cert),
            str(pki.client_key),
        )
        bridge = await aiohttp_client(create_app(config))
        resp = await bridge.post("/v1/rerank", json={"query": QUERY, "documents": CANDIDATES})
        assert resp.status == 200
        by_index = {r["index"]: r["relevance_score"] for r in (await resp.json())["results"]}
        expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES], normalize=True)
        assert [by_index[0], by_index[1]] == pytest.approx(expected, **FP32_REORDERED)

        without_cert = BridgeConfig(grpc_target=f"127.0.0.1:{srv.port}", grpc_ca=str(pki.ca), deadline_s=3)
        bridge = await aiohttp_client(create_app(without_cert))
        resp = await bridge.post("/v1/rerank", json={"query": QUERY, "documents": CANDIDATES})
        assert resp.status in (503, 504)  # the server wants a client certificate
    finally:
        await srv.stop(0)


def test_bridge_tls_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--grpc-cert and --grpc-key go together"):
        BridgeConfig(grpc_ca=str(pki.ca), grpc_cert=str(pki.client_cert))
    with pytest.raises(ValueError, match="--grpc-cert needs --grpc-ca"):
        BridgeConfig(grpc_cert=str(pki.client_cert), grpc_key=str(pki.client_key))
    with pytest.raises(ValueError, match="--tls-client-ca needs --tls-cert"):
        BridgeConfig(tls_client_ca=str(pki.ca))
    with pytest.raises(ValueError, match="--grpc-ca .*missing.pem.*: no such file"):
        BridgeConfig(grpc_ca=str(tmp_path / "missing.pem"))


async def test_healthcheck_speaks_tls(model_dir: Path, engine: Any, pki: Pki) -> None:
    srv = RerankServer(
        test_config(model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)), engine=engine
    )
    await srv.start()
    try:
        target, ca = f"127.0.0.1:{srv.port}", str(pki.ca)
        tls = healthcheck.credentials(ca)
        assert await asyncio.to_thread(healthcheck.check, target, "", 5.0, tls, "localhost") == "SERVING"
        assert await asyncio.to_thread(healthcheck.check, target, "", 2.0) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        wrong_name = await asyncio.to_thread(healthcheck.check, target, "", 2.0, tls, "elsewhere.example")
        assert wrong_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")  # the certificate is verified, name included
    finally:
        await srv.stop(0)
