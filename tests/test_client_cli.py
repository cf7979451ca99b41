"""`python -m clients.python_client`'s connection and request flags against a mutual-TLS server with an API key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import RerankerClient
from clients.cli import main
from tests.conftest import FP32_REORDERED, test_config
from tests.pki import Pki
from tests.server_thread import ServerThread

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."]
HOWS = ("truncate", "chunk")
LONG = " ".join(["The giant panda eats bamboo."] * 40 + ["Pandas are bears; the query is about a panda."])


@pytest.fixture(scope="module")
def secure(model_dir: Path, engine: Any, pki: Pki) -> Iterator[ServerThread]:
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_client_ca": str(pki.ca)}
    srv = ServerThread(test_config(model_dir, api_key="s3cret", **tls), engine)
    yield srv
    srv.stop()


def connection(secure: ServerThread, pki: Pki, *leave_out: str) -> list[str]:
    """The flags that reach `secure`: root certificates, client certificate and key, API key; less `leave_out`."""
    flags = {
        "--root-certs": str(pki.ca),
        "--client-cert": str(pki.client_cert),
        "--client-key": str(pki.client_key),
        "--api-key": "s3cret",
    }
    return ["--target", f"127.0.0.1:{secure.port}"] + [
        a for k, v in flags.items() if k not in leave_out for a in (k, v)
    ]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """main(argv) in this process: (exit code, the JSON it printed or None, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), json.loads(out) if out.strip() else None, err


def test_rerank_over_mutual_tls_with_an_api_key_normalize_and_model(
    secure: ServerThread, pki: Pki, flag_reranker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = secure.server.config.default_model
    query = ["--query", QUERY, *[a for c in CANDIDATES for a in ("--candidate", c)]]
    code, out, err = run(capsys, "rerank", *connection(secure, pki), *query, "--normalize", "--model", model)
    assert code == 0, err
    expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES], normalize=True)
    assert out["scores"] == pytest.approx(expected, **FP32_REORDERED) and out["model"] == model
    code, _, err = run(capsys, "rerank", *connection(secure, pki), *query, "--model", "nope")
    assert code == 1 and err.startswith("error: NOT_FOUND") and "nope" in err  # --model reaches the server
    code, _, err = run(capsys, "rerank", *connection(secure, pki, "--api-key"), *query)
    assert code == 1 and err.startswith("error: UNAUTHENTICATED")
    code, _, err = run(capsys, "info", *connection(secure, pki, "--client-cert", "--client-key"), "--timeout", "2")
    assert code == 1 and "Traceback" not in err  # mutual TLS: no client certificate, no answer


def test_long_documents_flag_chooses_how_a_long_passage_is_scored(
    secure: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, cert, key = pki.ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    with RerankerClient(
        f"127.0.0.1:{secure.port}", api_key="s3cret", root_certificates=ca, tls_client_cert=cert, tls_client_key=key
    ) as client:
        want = {
            how: client.rerank(QUERY, [LONG], max_length=32, long_documents=how).scores for how in ("truncate", "chunk")
        }
    assert want["truncate"] != pytest.approx(want["chunk"], abs=1e-4)  # the two really differ on this passage
    for how in HOWS:
        argv = ["--query", QUERY, "--candidate", LONG, "--max-length", "32", "--long-documents", how]
        code, out, err = run(capsys, "rerank", *connection(secure, pki), *argv)
        assert code == 0, err
        assert out["scores"] == pytest.approx(want[how], **FP32_REORDERED)


def test_tls_flag_uses_the_system_roots(secure: ServerThread, pki: Pki) -> None:
    # gRPC's system roots, pointed at the test CA for this child only (the variable is read once per process).
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki.ca)}
    argv = connection(secure, pki, "--root-certs")
    proc = subprocess.run(
        [sys.executable, "-m", "clients.python_client", "health", "--tls", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"status": "SERVING"}
