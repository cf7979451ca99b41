"""The blocking RerankerClient and the command line, against a real server on another thread's loop."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import InvalidRequestError, RerankerClient, Retry, UnavailableError
from tests.conftest import FP32_REORDERED, test_config
from tests.server_thread import ServerThread
from tests.test_client import free_port

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda is a bear species endemic to China.", "今天天气怎么样"]


@pytest.fixture(scope="module")
def live(model_dir: Path, engine: Any) -> Iterator[ServerThread]:
    srv = ServerThread(test_config(model_dir), engine)
    yield srv
    srv.stop()


@pytest.fixture
def client(live: ServerThread) -> Iterator[RerankerClient]:
    with RerankerClient(f"127.0.0.1:{live.port}", timeout=20) as c:
        yield c


def test_rerank(client: RerankerClient, flag_reranker: Any) -> None:
    out = client.rerank(QUERY, CANDIDATES, top_n=2, normalize=True, return_documents=True)
    expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES], normalize=True)
    assert out.scores == pytest.approx(expected, **FP32_REORDERED)
    best = sorted(range(len(CANDIDATES)), key=lambda i: -expected[i])[:2]
    assert [(r.index, r.document) for r in out.results] == [(i, CANDIDATES[i]) for i in best]
    assert out.usage.pairs == len(CANDIDATES)


def test_score_pairs_model_info_health(client: RerankerClient, live: ServerThread, flag_reranker: Any) -> None:
    pairs = [(QUERY, "hi"), ("hi", QUERY)]
    assert client.score_pairs(pairs, max_length=64) == pytest.approx(
        flag_reranker.compute_score([list(p) for p in pairs]), **FP32_REORDERED
    )
    info = client.model_info()
    assert (
        info.model == live.server.config.default_model and info.batch_size == live.server.batching.batch_size == 32
    )  # CPU default
    assert client.health() == "SERVING"
    client.wait_until_ready(timeout=10)


def test_typed_errors(client: RerankerClient) -> None:
    with pytest.raises(InvalidRequestError) as err:
        client.rerank("", ["hi"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message == "query is empty"
    retry = Retry(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    with RerankerClient(f"127.0.0.1:{free_port()}", retry=retry) as nowhere:
        with pytest.raises(UnavailableError):
            nowhere.health()
        with pytest.raises(UnavailableError, match="not SERVING after"):
            nowhere.wait_until_ready(timeout=0.3)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.python_client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_rerank_prints_ranked_json(live: ServerThread) -> None:
    args = ["rerank", "--target", f"127.0.0.1:{live.port}", "--query", QUERY, "--top-n", "2", "--return-documents"]
    proc = cli(*args, *[a for c in CANDIDATES for a in ("--candidate", c)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["scores"]) == 3 and len(out["results"]) == 2
    assert [r["score"] for r in out["results"]] == sorted(out["scores"], reverse=True)[:2]
    assert all(r["document"] == CANDIDATES[r["index"]] for r in out["results"])
    assert "RuntimeWarning" not in proc.stderr


def test_cli_health_and_info(live: ServerThread) -> None:
    proc = cli("health", "--target", f"127.0.0.1:{live.port}")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"status": "SERVING"}
    proc = cli("info", "--target", f"127.0.0.1:{live.port}")
    assert proc.returncode == 0 and json.loads(proc.stdout)["model"] == live.server.config.default_model


def test_cli_errors_are_one_line_without_traceback(live: ServerThread) -> None:
    proc = cli("rerank", "--target", f"127.0.0.1:{live.port}", "--query", QUERY, "--candidate", " ")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: INVALID_ARGUMENT: candidates[0] is empty"
    proc = cli("health", "--target", "reranker-0:1", "--target", "reranker-1:1")
    assert proc.returncode == 2 and "dns:///name:port" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "20")
    assert proc.returncode == 1 and proc.stderr.startswith("error: UNAVAILABLE") and "Traceback" not in proc.stderr
