"""Issue 18's smaller items: an unknown enum value, the healthcheck against TLS, a reload's broken JSON file,
ambiguous API keys (gRPC and REST), and tools.make_model's files."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge import BridgeConfig, create_app
from server import healthcheck
from server.app import RerankServer
from tests.conftest import test_config
from tests.pki import Pki

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda is a bear species endemic to China."]
KEY = "s3cret-key"


async def test_an_unknown_long_documents_value_is_refused_naming_the_known_ones(stub: pb_grpc.RerankerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, long_documents=99))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = err.value.details() or ""
    assert "long_documents 99" in message
    for name in pb.LongDocuments.keys():
        assert name in message
    ok = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=CANDIDATES, long_documents=pb.LONG_DOCUMENTS_CHUNK))
    assert len(ok.scores) == 2


async def test_healthcheck_without_tls_flags_says_the_server_may_need_tls(
    model_dir: Path, engine: Any, pki: Pki, capsys: Any
) -> None:
    srv = RerankServer(
        test_config(model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)), engine=engine
    )
    await srv.start()
    try:
        target = f"127.0.0.1:{srv.port}"
        assert await asyncio.to_thread(healthcheck.main, ["--target", target, "--timeout", "2"]) == 1
        out = capsys.readouterr().out
        assert "the server may need TLS" in out and "--tls-ca" in out
        tls = ["--tls-ca", str(pki.ca)]
        assert await asyncio.to_thread(healthcheck.main, ["--target", target, *tls]) == 0
        assert "TLS" not in capsys.readouterr().out.replace(target, "")
    finally:
        await srv.stop(0)


async def test_a_reload_that_fails_on_a_broken_config_json_names_the_file(
    model_dir: Path, tmp_path: Path, caplog: Any
) -> None:
    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    srv = RerankServer(test_config(live))
    await srv.start()
    try:
        (live / "config.json").write_text('{"architectures": ["XLMRobertaForSequenceClassification"], oops}')
        with caplog.at_level(logging.ERROR, logger="server.reload"):
            assert await srv.reloader.reload() == {"live": "failed"}
        [line] = [r.getMessage() for r in caplog.records if r.name == "server.reload"]
        assert f"{live / 'config.json'} is not valid JSON" in line and "line 1 column" in line, line
    finally:
        await srv.stop(0)


async def test_two_authorization_entries_are_refused_as_ambiguous(model_dir: Path, engine: Any) -> None:
    srv = RerankServer(test_config(model_dir, api_key=KEY), engine=engine)
    await srv.start()
    request = pb.RerankRequest(query=QUERY, candidates=CANDIDATES)
    right, wrong = ("authorization", f"Bearer {KEY}"), ("authorization", "Bearer nope")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.RerankerStub(channel)
            assert len((await stub.Rerank(request, metadata=(right,))).scores) == 2
            for metadata in ((wrong, right), (right, wrong), (right, right)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Rerank(request, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "several 'authorization' metadata entries" in (err.value.details() or "")
    finally:
        await srv.stop(0)


async def test_two_authorization_headers_are_a_401_before_calling_grpc(model_dir: Path, aiohttp_client: Any) -> None:
    from tests.test_bridge_process import free_port

    # Nothing listens at the target: the refusal must come before any gRPC call (which would be a 503).
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{free_port()}")))
    body = {"query": QUERY, "documents": CANDIDATES}
    headers = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer nope")]
    for path in ("/v1/rerank", "/rerank"):
        resp = await bridge.post(path, json=body, headers=headers)
        assert resp.status == 401
        answer = await resp.json()
        assert "several Authorization headers" in answer.get("message", answer.get("error"))
        assert KEY not in await resp.text()


def test_make_model_writes_files_others_can_read_and_prints_only_the_path(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.make_model", str(out), "--shape", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}\n"
    assert "it/s" not in proc.stderr and "Writing model shards" not in proc.stderr, proc.stderr
    files = sorted(out.iterdir())
    assert any(f.name == "model.safetensors" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_the_offline_error_names_the_random_model_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from server.engine.model import ModelLoadError, resolve_model_path
    from tests.test_bridge_process import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # a hub that refuses connections
    with pytest.raises(ModelLoadError) as err:
        resolve_model_path("nobody/no-such-reranker")
    message = str(err.value)
    assert "cannot be reached" in message
    assert "python -m tools.make_model ./models/tiny --shape tiny" in message
    assert "python -m server --model ./models/tiny" in message
    # The download command is one the pinned huggingface-hub installs (it dropped huggingface-cli).
    assert "`hf download nobody/no-such-reranker --local-dir ./models/no-such-reranker`" in message
    hf = Path(sys.executable).with_name("hf")
    assert subprocess.run([str(hf), "download", "--help"], capture_output=True, timeout=60).returncode == 0
