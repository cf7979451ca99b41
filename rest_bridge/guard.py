"""The REST port against slow and vanished clients: header and body deadlines, a connection cap, TLS.

- Headers: aiohttp's keep-alive timer runs from the connection's start (and from the end of each response)
  and closes a connection whose next request's headers are not complete by then, so `header_timeout_s` is
  passed to aiohttp as `keepalive_timeout`. The TLS handshake gets the same bound.
- Body: `body_middleware` reads the whole body within `body_timeout_s` (408 otherwise) before any handler; a
  declared Content-Length above the limit gets 413 before any of it is read.
- Malformed HTTP: what aiohttp's parser refuses is answered in the bridge's JSON shape and logged as one INFO
  line that quotes nothing of the request (`JsonErrorHandler`).
- Connections: past `max_connections` open ones, a new connection gets an immediate 503 and is closed.
- `Expect`: only `100-continue`, and `100 Continue` only when the body may be sent: a declared length over the
  limit gets 413 without inviting the body; another value gets 417 (JSON, nothing echoed).
- A body whose framing breaks in a later packet (a bad chunk size) fails its request at once with 400, rather than
  waiting for the body timeout.
- The `Server` header names no versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from rest_bridge.errors import BadRequest, error_body, parser_error, payload_error

access_log = logging.getLogger("rest_bridge.access")
log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LINGER_S = 2.0  # after an early answer (408, 413), how long unread body bytes are still drained before closing
WARN_EVERY_S = 10.0
SERVER_NAME = "reranker"  # the Server header: aiohttp's default names its version and Python's


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The answer to an `Expect` header, before any middleware: None lets the request go on to its handler."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no 100 Continue: the header is ignored, as aiohttp does
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        status, message = 417, "the Expect header supports only the value 100-continue"
    elif request.content_length is not None and request.content_length > request.client_max_size:
        status, message = 413, f"request body is larger than the limit of {request.client_max_size} bytes"
    else:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body's answer is still to come
        return None
    status, body = error_body(request, status, message)
    response = web.json_response(body, status=status)
    response.force_close()  # the client may send the body anyway: not read as a next request
    return response


def guard_routes(app: web.Application) -> None:
    """Every route answers `Expect` with expect_continue (aiohttp takes an expect handler per route only)."""
    for route in app.router.routes():
        route._expect_handler = expect_continue  # type: ignore[attr-defined]


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a Server header without versions."""
    response.headers[hdrs.SERVER] = SERVER_NAME


def ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """HTTPS with `cert`/`key`; with `client_ca`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def body_middleware(body_timeout_s: float) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Read the request body within `body_timeout_s`; a client gone mid-body is one INFO access line."""

    @web.middleware
    async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > request.client_max_size:
            raise web.HTTPRequestEntityTooLarge(request.client_max_size, declared)  # without waiting for the body
        if request.body_exists:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(body_timeout_s):
                    await request.read()  # cached: the handlers' read() and json() use the same bytes
            except TimeoutError:
                message = f"the request body did not arrive within {body_timeout_s:g} s (--rest-body-timeout-s)"
                _access(request, 408, start, message)
                raise web.HTTPRequestTimeout(reason=message) from None
            except ConnectionError:
                _access(request, 499, start, "the client closed the connection before sending the whole body")
                return web.Response(status=400)  # nobody is there to read it
            except RequestPayloadError as exc:
                request.content.feed_eof()  # nothing more can be read: no lingering read that would fail again
                raise BadRequest(payload_error(exc)) from None
        return await handler(request)

    return read_body


def _access(request: web.Request, status: int, start: float, reason: str) -> None:
    ms = (time.perf_counter() - start) * 1e3
    access_log.info("rest %s %s status=%d ms=%.1f: %s", request.method, request.path, status, ms, reason)


class _Refuse(asyncio.Protocol):
    """Answers 503 at once and closes: the connection cap is reached."""

    def __init__(self, limit: int) -> None:
        text = f"too many open connections: the limit is {limit} (--rest-max-connections); retry shortly"
        body = json.dumps({"error": text, "status": 503}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._response = head.encode() + body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._response)  # type: ignore[attr-defined]
        transport.close()


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser refuses as the bridge's JSON, not text.

    aiohttp's own answer quotes the offending bytes (a header with an API key in it) and logs each one at ERROR
    with a traceback; a malformed request is the client's fault: one INFO line, naming only the problem.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status, text = parser_error(exc, self.max_headers)
        access_log.info("rest refused a malformed request from %s: status=%d %s", request.remote, status, text)
        response = web.json_response({"error": text, "status": status}, status=status)
        response.headers[hdrs.SERVER] = SERVER_NAME
        response.force_close()
        return response

    def data_received(self, data: bytes) -> None:
        """A parser error inside the body of the request being served fails that request's body read at once
        (body_middleware answers 400); aiohttp would queue it as a next request, and the read would wait for the
        body timeout."""
        queued = len(self._messages)
        super().data_received(data)
        request = self._current_request
        if request is None or len(self._messages) <= queued or not isinstance(self._messages[-1][0], _ErrInfo):
            return
        if request.content.is_eof():
            return  # its body was complete: the error is the next request's
        error = self._messages.pop()[0]
        failed = RequestPayloadError("the request body is malformed")
        failed.__cause__ = error.exc
        request.content.set_exception(failed)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted as open until the connection is lost.

    Counted from creation: asyncio creates protocols for a burst of accepted sockets before any of them is
    connected, so counting aiohttp's connected handlers would let a burst through the cap.
    """

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite) -> None:
        self._inner = inner
        site.open_connections += 1
        # Also released when the connection never starts (a failed TLS handshake): then connection_lost never comes.
        self._release = weakref.finalize(self, site.release)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._inner.connection_lost(exc)


class GuardedSite(web.TCPSite):
    """A TCPSite that caps open connections and bounds the TLS handshake."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        handshake_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=1024)
        self._max_connections = max_connections
        self._handshake_timeout_s = handshake_timeout_s
        self.open_connections = 0
        self._refused = 0
        self._warned_at = -WARN_EVERY_S

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner; the server is created here
        self._server = await asyncio.get_running_loop().create_server(
            self._accept,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout_s if self._ssl_context else None,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]

    def release(self) -> None:
        self.open_connections -= 1

    def _accept(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if self.open_connections < self._max_connections:
            # What server() does, with our handler class: aiohttp has no setting for it.
            handler = JsonErrorHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)
            return _Counted(handler, self)
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:  # one line per interval, however hard the port is hit
            self._warned_at = now
            log.warning(
                "refused %d connection(s) so far: %d are open, the limit (--rest-max-connections)",
                self._refused,
                self._max_connections,
            )
        return _Refuse(self._max_connections)
