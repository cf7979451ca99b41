"""`python -m server --rest-port` and `python -m rest_bridge` as real processes; the literal parser; the config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from rest_bridge.config import BridgeConfig, load_bridge_config
from rest_bridge.literal import LiteralError, parse_text_pairs
from server.config import load_config
from server.connections import LocalSocket
from tests.subprocess_server import wait_for_line

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start(args: list[str], ready: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m ...`, its log going to `log`, and wait (60 s at most) for the line containing `ready`."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stderr=out)
    try:
        return proc, wait_for_line(proc, log, ready)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_with_rest_port_serves_both_and_stops_cleanly(
    model_dir: Path, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    rest = free_port()
    args = ["server", "--host", "127.0.0.1", "--port", "0", "--rest-port", str(rest), "--model", str(model_dir)]
    proc, line = start(args, "serving model=", tmp_path / "server.log")
    processes.append(proc)
    assert f"rest_port={rest}" in line
    status, body = http("POST", f"http://127.0.0.1:{rest}/bge-reranker-base/post", {"text_pairs": "[['q', 'p']]"})
    assert status == 200 and body["code"] == 200 and len(body["rerank_scores"]) == 1
    assert http("GET", f"http://127.0.0.1:{rest}/health") == (200, {"status": "SERVING"})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_standalone_bridge_without_a_server_answers_503_and_stops_cleanly(
    processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    rest, nowhere = free_port(), free_port()
    args = ["rest_bridge", "--grpc-target", f"127.0.0.1:{nowhere}", "--host", "127.0.0.1", "--port", str(rest)]
    proc, _ = start(args, "REST bridge on", tmp_path / "bridge.log")
    processes.append(proc)
    status, body = http("POST", f"http://127.0.0.1:{rest}/rerank", {"query": "q", "compare_to": ["a"]})
    assert status == 503 and "cannot be reached" in body["error"]
    assert http("GET", f"http://127.0.0.1:{rest}/health")[0] == 503
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_a_killed_servers_socket_directory_is_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"reranker-{int(gone.stdout)}-abc"  # what a SIGKILLed server leaves behind
    live = tmp_path / f"reranker-{os.getpid()}-def"  # a server still running (this process)
    other = tmp_path / "reranker-notapid"
    for d in (stale, live, other):
        d.mkdir()
        (d / "grpc.sock").touch()
    server = grpc.server(ThreadPoolExecutor(1))
    local = LocalSocket()
    try:
        target = local.bind(server)  # type: ignore[arg-type]  # binds the same on a blocking server
        mine = Path(target.removeprefix("unix:")).parent
        assert mine.name.startswith(f"reranker-{os.getpid()}-") and mine.parent == tmp_path
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, mine.name])
    finally:
        local.remove()
        server.stop(0)
    assert not mine.exists()


def test_bridge_config_flags_and_environment() -> None:
    env = {"RERANKER_GRPC_TARGET": "10.0.0.1:50051", "RERANKER_REST_PORT": "7000", "RERANKER_REST_DEADLINE_S": "2.5"}
    config = load_bridge_config([], env)
    assert config == BridgeConfig(grpc_target="10.0.0.1:50051", port=7000, deadline_s=2.5)
    assert load_bridge_config(["--port", "6010", "--max-pairs", "5"], env).port == 6010
    with pytest.raises(SystemExit):
        load_bridge_config(["--deadline-s", "0"], {})
    assert load_config([], {"RERANKER_REST_PORT": "6009"}).rest_port == 6009
    assert load_config([]).rest_port == 0
    with pytest.raises(SystemExit):
        load_config(["--rest-port", "70000"], {})


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("[['a', 'b']]", [["a", "b"]]),
        ('[ ["a" , "b" ,] , ("c", \'d\'), ]', [["a", "b"], ["c", "d"]]),
        (r"[['it\'s', 'tab\there\\ \x41\u4e2d\U0001F600 \n']]", [["it's", "tab\there\\ A中😀 \n"]]),
        (str([["什么是函数计算", 'say "hi"\n']]), [["什么是函数计算", 'say "hi"\n']]),
    ],
)
def test_literal_parser_accepts_lists_of_string_pairs(text: str, pairs: list[list[str]]) -> None:
    assert parse_text_pairs(text, max_chars=1000, max_pairs=10) == pairs


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected '['"),
        ("[['a', 'b']] x", "unexpected text after the list"),
        ("[['a', 'b']", "expected ',' or ']'"),
        ("[['a', b]]", "expected a quoted string"),
        ("[['a', 1]]", "expected a quoted string"),
        ("[[u'a', 'b']]", "expected a quoted string"),
        ("[['a', '''b''']]", "triple-quoted"),
        ("[['a', 'b\\q']]", "unsupported escape"),
        ("[['a', '\\ud800']]", "not a valid character"),
        ("[['a', 'b\n']]", "unterminated string"),
        ("[['a', 'b'] ['c', 'd']]", "expected ',' or ']'"),
        ("[['a', 'b', ]", "expected ',' or ']'"),
        ("(('a', 'b'),)", "expected '['"),
        ("[" * 10000, "expected a quoted string"),  # no recursion to exhaust
    ],
)
def test_literal_parser_refuses_everything_else(text: str, problem: str) -> None:
    with pytest.raises(LiteralError) as err:
        parse_text_pairs(text, max_chars=100_000, max_pairs=10)
    assert problem in str(err.value)


def test_literal_parser_limits() -> None:
    with pytest.raises(LiteralError, match="has 22 characters; the limit is 20"):
        parse_text_pairs("[['aaaaaa', 'bbbbbb']]", max_chars=20, max_pairs=10)
    with pytest.raises(LiteralError, match="more than 2 pairs; the limit is 2"):
        parse_text_pairs("[['a', 'b'], ['a', 'b'], ['a', 'b']]", max_chars=100, max_pairs=2)
