"""Slow, idle, vanished and excess connections on both ports, bounded and on loopback.

`python -m pytest -s tests/test_slow_clients.py` prints the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import RerankerClient, Retry, UnavailableError
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge import BridgeConfig, start_bridge
from server.app import RerankServer
from tests.conftest import test_config
from tests.ops_helpers import free_port, until
from tests.subprocess_server import ServerProcess

PER_PORT = 1500  # trickling connections on each port
HEADER_S, BODY_S, HANDSHAKE_S = 1.0, 2.0, 1.0
LINGER_S = 2.0  # rest_bridge/guard.py: unread body bytes after an early answer, then the close
CLOSE_DEADLINE_S = 60  # a generous bound, never a verdict: the server closes these within its timeouts (1-5 s)
QUERY, CANDIDATES = "what is panda?", ["hi", "The giant panda is a bear species endemic to China."]
BODY = json.dumps({"query": QUERY, "documents": CANDIDATES}).encode()


@pytest.fixture
def _enough_file_descriptors() -> Iterator[None]:
    """Only the slowloris test holds thousands of sockets; the soft limit is raised for it and put back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8 * PER_PORT if hard == resource.RLIM_INFINITY else min(hard, 8 * PER_PORT)
    if wanted < 3 * PER_PORT:
        pytest.skip(f"needs {3 * PER_PORT} open files; the hard limit (ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# What each kind of slow client sends at once, then one byte a second until the server closes the connection.
ATTACKS = {
    "rest: nothing": (b"", b""),
    "rest: headers, a byte a second": (b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 60),
    "rest: 100 kB body, a byte a second": (
        b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        b" " * 60,
    ),
    "grpc: nothing": (b"", b""),
    "grpc: preface, a byte a second": (b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
}


async def _attacker(port: int, kind: str) -> tuple[str, float, bool]:
    """Open a connection, behave as `kind`; (kind, seconds until closed, whether the server closed it)."""
    first, drip = ATTACKS[kind]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    closed = asyncio.ensure_future(reader.read(-1))
    by_server = False
    try:
        writer.write(first)
        # Keep behaving as `kind` (a byte a second) until the server closes, or CLOSE_DEADLINE_S passes.
        for i in range(CLOSE_DEADLINE_S):
            done, _ = await asyncio.wait({closed}, timeout=1.0)
            if done:
                break
            if i < len(drip):
                writer.write(bytes([drip[i]]))
        by_server = closed.done()
        if by_server:
            closed.exception()  # retrieved: a reset is the server closing too
    finally:
        closed.cancel()
        writer.close()
    return kind, time.monotonic() - started, by_server


def _callers(grpc_target: str, rest_port: int, stop: threading.Event, outcomes: Counter[str]) -> None:
    """A normal client on each port, one call after another, until `stop`."""
    with RerankerClient(grpc_target, retry=Retry(max_attempts=1), timeout=20) as client:
        while not stop.is_set():
            try:
                assert len(client.rerank(QUERY, CANDIDATES).scores) == 2
                outcomes["grpc ok"] += 1
            except Exception as exc:
                outcomes[f"grpc {type(exc).__name__}"] += 1
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{rest_port}/v1/rerank", BODY, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=20) as resp:
                    outcomes["rest ok" if resp.status == 200 else f"rest {resp.status}"] += 1
            except Exception as exc:
                outcomes[f"rest {type(exc).__name__}"] += 1
            time.sleep(0.05)


@pytest.mark.usefixtures("_enough_file_descriptors")
async def test_slowloris_on_both_ports_is_closed_by_the_server_and_callers_are_served(
    model_dir: Path, tmp_path: Path
) -> None:
    rest_port = free_port()
    srv = ServerProcess(
        model_dir,
        tmp_path / "server.log",
        *("--rest-port", str(rest_port), "--threads", "1"),
        *("--handshake-timeout-s", str(HANDSHAKE_S), "--max-connections", str(4 * PER_PORT)),
        *("--rest-header-timeout-s", str(HEADER_S), "--rest-body-timeout-s", str(BODY_S)),
        *("--rest-max-connections", str(4 * PER_PORT)),
    )
    limits = {  # when the server should close each kind; printed beside what it took, never asserted (a busy machine)
        "rest: nothing": HEADER_S,
        "rest: headers, a byte a second": HEADER_S,
        "rest: 100 kB body, a byte a second": HEADER_S + BODY_S + LINGER_S,
        "grpc: nothing": HANDSHAKE_S,
        "grpc: preface, a byte a second": HANDSHAKE_S,
    }
    stop, outcomes = threading.Event(), Counter[str]()
    callers = threading.Thread(target=_callers, args=(srv.target, rest_port, stop, outcomes), daemon=True)
    try:
        callers.start()
        start = time.monotonic()
        kinds = list(limits)
        attacks = [
            _attacker(rest_port if kind.startswith("rest") else srv.port, kind)
            for i in range(PER_PORT)
            for kind in (kinds[i % 3], kinds[3 + i % 2])
        ]
        results = await asyncio.gather(*attacks)
        elapsed = time.monotonic() - start
        await until(lambda: outcomes["grpc ok"] >= 3 and outcomes["rest ok"] >= 3, 60)
        stop.set()
        await asyncio.to_thread(callers.join, 60)
    finally:
        stop.set()
        srv.stop()
    log = srv.log()
    slowest: dict[str, float] = {}
    for kind, seconds, _ in results:
        slowest[kind] = max(slowest.get(kind, 0.0), seconds)
    print(
        f"\nslowloris: {len(results)} connections ({PER_PORT} per port) in {elapsed:.1f} s; "
        f"slowest close by kind (s): { {k: round(v, 2) for k, v in slowest.items()} } (expected {limits}); "
        f"callers: {dict(outcomes)}"
    )
    kept_open = Counter(kind for kind, _, by_server in results if not by_server)
    assert not kept_open, f"connections the server left open for {CLOSE_DEADLINE_S} s, by kind: {dict(kept_open)}"
    assert set(outcomes) == {"grpc ok", "rest ok"}, outcomes  # every normal call was served
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    assert "refused" not in log  # below the caps: closed by the timeouts, not turned away


async def test_past_the_connection_caps_new_connections_are_refused_clearly(
    model_dir: Path, engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = RerankServer(test_config(model_dir, max_connections=8), engine=engine)
    await srv.start()
    bridge, rest_port = await start_bridge(
        BridgeConfig(grpc_target=f"127.0.0.1:{srv.port}", host="127.0.0.1", port=0, max_connections=8)
    )
    idle: list[asyncio.StreamWriter] = []
    try:
        for port in (srv.port, rest_port):
            for _ in range(8):
                idle.append((await asyncio.open_connection("127.0.0.1", port))[1])
        reader, _ = await asyncio.open_connection("127.0.0.1", rest_port)
        refusal = await asyncio.wait_for(reader.read(-1), 10)
        assert refusal.startswith(b"HTTP/1.1 503 ")
        assert b"too many open connections: the limit is 8 (--rest-max-connections)" in refusal

        def grpc_call() -> None:
            with RerankerClient(f"127.0.0.1:{srv.port}", retry=Retry(max_attempts=1), timeout=5) as client:
                client.model_info()

        with pytest.raises(UnavailableError):  # gRPC closes the connection at once; the client may retry later
            await asyncio.to_thread(grpc_call)
        for writer in idle:
            writer.close()
        idle.clear()
        await _served_again(grpc_call)
    finally:
        for writer in idle:
            writer.close()
        await bridge.cleanup()
        await srv.stop(0)


async def _served_again(call: Callable[[], None], deadline_s: float = 30.0) -> None:
    """Call until gRPC has noticed the freed connections and serves again; fail after `deadline_s`."""
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                return await asyncio.to_thread(call)
            except UnavailableError:
                await asyncio.sleep(0.1)


async def test_a_client_gone_mid_body_is_one_info_line(model_dir: Path, engine: Any, caplog: Any) -> None:
    srv = RerankServer(test_config(model_dir), engine=engine)
    await srv.start()
    bridge, rest_port = await start_bridge(BridgeConfig(grpc_target=f"127.0.0.1:{srv.port}", host="127.0.0.1", port=0))
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", rest_port)
            head = b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
            writer.write(head)
            # aiohttp answers 100 Continue once the request reached the app: the body is being waited for.
            assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"HTTP/1.1 100 ")
            writer.write(b'{"query": ')
            await writer.drain()
            writer.transport.abort()  # vanish mid-body

            def gone() -> list[logging.LogRecord]:
                lines = [r for r in caplog.records if r.name.startswith("rest_bridge")]
                return [r for r in lines if "closed the connection before sending the whole body" in r.getMessage()]

            await until(lambda: bool(gone()), 30)
        (line,) = gone()
        assert line.levelno == logging.INFO and line.name == "rest_bridge.access"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        await bridge.cleanup()
        await srv.stop(0)


async def test_an_idle_connection_is_sent_away(model_dir: Path, engine: Any) -> None:
    """--max-connection-idle-s: a connection without calls gets a GOAWAY; its channel goes idle and reconnects."""
    srv = RerankServer(test_config(model_dir, max_connection_idle_s=0.5), engine=engine)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.RerankerStub(channel)
            await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # The client's own idle timer is 30 minutes: only the server's GOAWAY takes it out of READY this soon.
            await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 30)
            assert channel.get_state() == grpc.ChannelConnectivity.IDLE
            assert (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)).model  # a new connection serves
    finally:
        await srv.stop(0)
