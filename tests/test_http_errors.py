"""What aiohttp's own HTTP parser refuses, bodies that cannot be decoded, and oversize declared lengths.

Each answers the bridge's JSON error with a 4xx status, is logged as at most one INFO line without a traceback,
and never echoes or logs a header's value. Raw requests over a real socket to a real bridge (start_bridge).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rest_bridge import BridgeConfig, start_bridge
from tests.test_bridge_process import free_port

SECRET = "sk-live-7c1d0e55aa41"
HEAD = b"Host: x\r\n"

# (raw request, status, words the message must contain)
MALFORMED: dict[str, tuple[bytes, int, str]] = {
    "header line over 8190 bytes": (
        b"GET /health HTTP/1.1\r\n" + HEAD + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "longer than 8190 bytes",
    ),
    "200 headers": (
        b"GET /health HTTP/1.1\r\n" + HEAD + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n",
        431,
        "more than 128 header lines",
    ),
    "bad chunk size": (
        b"POST /rerank HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
        "chunk size",
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /rerank HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding can't be present with Content-Length",
    ),
    "bad method": (b"G@T /health HTTP/1.1\r\n" + HEAD + b"\r\n", 400, "invalid method"),
    "bad method, second request": (
        b"GET /openapi.json HTTP/1.1\r\n" + HEAD + b"\r\nG(T /health HTTP/1.1\r\n" + HEAD + b"\r\n",
        400,
        "invalid method",
    ),
    "NUL in the path": (b"GET /he\x00alth HTTP/1.1\r\n" + HEAD + b"\r\n", 400, "request target"),
    "Content-Length -1": (b"POST /rerank HTTP/1.1\r\n" + HEAD + b"Content-Length: -1\r\n\r\n", 400, "Content-Length"),
    "TLS on the plain port": (b"\x16\x03\x01\x00\xa5\x01\x00\x00", 400, "not HTTPS"),
    "API key with a 0x7f byte": (
        b"POST /rerank HTTP/1.1\r\n" + HEAD + f"Authorization: Bearer {SECRET}\x7f\r\n".encode() + b"\r\n",
        400,
        "Invalid header value char",
    ),
}


@pytest.fixture
async def bridge() -> AsyncIterator[int]:
    # Parser errors never reach gRPC: nothing needs to listen at the target.
    config = BridgeConfig(grpc_target=f"127.0.0.1:{free_port()}", host="127.0.0.1", port=0, max_body_bytes=1000)
    runner, port = await start_bridge(config)
    yield port
    await runner.cleanup()


async def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw`; read responses up to the first error or close: its status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            while True:
                status, headers = await _head(reader)
                body = await reader.readexactly(int(headers["content-length"]))
                if reader.at_eof() or headers.get("connection", "").lower() == "close" or status >= 400:
                    return status, headers, body
    finally:
        writer.close()


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def _assert_quiet(caplog: Any, most: int = 1) -> list[logging.LogRecord]:
    """At most `most` lines from the bridge and aiohttp, all below WARNING, none with a traceback."""
    records = [r for r in caplog.records if r.name.startswith(("rest_bridge", "aiohttp"))]
    assert len(records) <= most, caplog.text
    for r in records:
        assert r.levelno <= logging.INFO and r.exc_info is None, caplog.text
    assert "Traceback" not in caplog.text
    return records


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_what_the_parser_refuses_is_json_and_one_info_line(bridge: int, caplog: Any, case: str) -> None:
    raw, want, words = MALFORMED[case]
    with caplog.at_level(logging.DEBUG):
        status, headers, body = await _exchange(bridge, raw)
        await asyncio.sleep(0.1)  # anything logged after the answer (closing the connection) lands too
    assert status == want
    assert headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["status"] == want and words in answer["error"]
    assert _assert_quiet(caplog), "the refusal is logged"


async def test_an_api_key_in_a_bad_header_is_neither_echoed_nor_logged(bridge: int, caplog: Any) -> None:
    raw = MALFORMED["API key with a 0x7f byte"][0]
    with caplog.at_level(logging.DEBUG):
        _, _, body = await _exchange(bridge, raw)
        await asyncio.sleep(0.1)
    assert SECRET not in body.decode("latin-1")
    assert SECRET not in caplog.text
    for r in caplog.records:
        assert SECRET not in str(r.args) and SECRET not in str(r.exc_info)


async def test_a_body_that_is_not_the_gzip_it_claims_is_a_400(bridge: int, caplog: Any) -> None:
    body = b'{"query": "q", "texts": ["a"]}'
    raw = b"POST /rerank HTTP/1.1\r\n" + HEAD + b"Content-Encoding: gzip\r\nContent-Type: application/json\r\n"
    raw += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with caplog.at_level(logging.DEBUG):
        status, headers, answer = await _exchange(bridge, raw)
        await asyncio.sleep(0.2)  # the connection is closed after the answer, not read on (which would fail again)
    assert status == 400 and headers["connection"].lower() == "close"
    assert "Content-Encoding" in json.loads(answer)["error"]
    _assert_quiet(caplog, most=0)


async def test_a_declared_length_over_the_limit_is_413_before_any_body(bridge: int) -> None:
    # No body is sent: an answer that waited for it would come only at the body timeout (30 s, past _exchange's 10).
    raw = b"POST /rerank HTTP/1.1\r\n" + HEAD + b"Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n"
    status, _, body = await _exchange(bridge, raw)
    assert status == 413
    assert json.loads(body) == {"error": "request body is larger than the limit of 1000 bytes", "status": 413}
    status, _, body = await _exchange(bridge, raw.replace(b"/rerank", b"/v1/rerank"))
    assert status == 413 and "1000 bytes" in json.loads(body)["message"]  # Cohere's routes keep Cohere's shape


POST = b"POST /rerank HTTP/1.1\r\n" + HEAD + b"Content-Type: application/json\r\n"


async def test_an_unknown_expect_is_a_json_417_that_echoes_nothing(bridge: int) -> None:
    status, headers, body = await _exchange(bridge, POST + b"Expect: <junk-7c1d>\r\nContent-Length: 2\r\n\r\n{}")
    assert status == 417 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": "the Expect header supports only the value 100-continue", "status": 417}
    assert b"junk-7c1d" not in body
    assert headers["server"] == "reranker"  # no aiohttp or Python version


async def test_expect_100_continue_is_sent_only_for_a_body_within_the_limit(bridge: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge)
    try:
        writer.write(POST + b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")  # over the 1000-byte limit
        async with asyncio.timeout(10):
            status, headers = await _head(reader)
        assert status == 413, "answered before inviting a body it would refuse"
        assert "1000 bytes" in json.loads(await reader.readexactly(int(headers["content-length"])))["error"]
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge)
    try:
        writer.write(POST + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await _head(reader))[0] == 100
            writer.write(b"{}")
            status, headers = await _head(reader)
        assert status == 400 and "query" in (await reader.readexactly(int(headers["content-length"]))).decode()
    finally:
        writer.close()


async def test_a_bad_chunk_size_in_a_later_packet_is_a_400_at_once(bridge: int, caplog: Any) -> None:
    """Not a 408 at the body timeout (30 s, past _exchange's 10 s bound): the parser's error fails the read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge)
    try:
        writer.write(POST + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n')
        await writer.drain()
        await asyncio.sleep(0.2)  # the first chunk is read on its own
        with caplog.at_level(logging.DEBUG):
            writer.write(b"zz\r\nabc\r\n0\r\n\r\n")
            async with asyncio.timeout(10):
                status, headers = await _head(reader)
                body = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
    assert status == 400 and headers["connection"].lower() == "close"
    assert "chunked Transfer-Encoding" in json.loads(body)["error"]
    _assert_quiet(caplog, most=0)
