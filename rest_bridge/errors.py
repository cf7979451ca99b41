"""The one error middleware: gRPC status and request problems -> an HTTP status and a JSON body."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import http_exceptions as http
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from rest_bridge.config import BridgeConfig

log = logging.getLogger(__name__)

HTTP_BY_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,  # a model this server does not serve
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}
UNAVAILABLE_MESSAGE = "the reranking server cannot be reached or is not ready; retry shortly"
# gRPC's own words speak of metadata; over HTTP the key travels in a header, on every route and dialect.
UNAUTHENTICATED_MESSAGE = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
DEADLINE_SETTING = (
    "RERANKER_REST_DEADLINE_S: --deadline-s of python -m rest_bridge, --rest-deadline-s of python -m server"
)

TEXT_PAIRS_KEY = web.RequestKey("text_pairs_raw", object)  # legacy 1's text_pairs as received, echoed on failure
ErrorShape = Callable[[int, str], tuple[int, dict[str, Any]]]  # (HTTP status, message) -> (status, JSON body)
ERROR_SHAPE_KEY = web.RequestKey("error_shape", object)  # the dialect's own error shape, once the route or body says
CONFIG_KEY = web.AppKey("bridge_config", BridgeConfig)
# For the metrics: the dialect, once a handler knows it (POST /rerank: from the body), and the status an error had
# where the answer says otherwise (legacy 1 answers a bad request with HTTP 200 and code -1).
DIALECT_KEY = web.RequestKey("dialect", str)
ERROR_STATUS_KEY = web.RequestKey("error_status", int)
COHERE_PREFIXES = ("/v1/", "/v2/")  # Cohere's routes answer errors in Cohere's shape
QUOTED = re.compile(r"(?<![A-Za-z])['\"]|['\"](?![A-Za-z])|\\")  # a quote that is not an apostrophe, a backslash


class BadRequest(ValueError):
    """A request the bridge refuses before calling gRPC; the message names the problem."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_status(exc: BaseException, config: BridgeConfig) -> tuple[int, str]:
    """HTTP status and caller-facing message for `exc`; unexpected errors are logged, never shown."""
    if isinstance(exc, BadRequest):
        return exc.status, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        status = HTTP_BY_STATUS.get(code, 502)
        if code == grpc.StatusCode.UNAVAILABLE:
            return status, f"{UNAVAILABLE_MESSAGE} ({exc.details()})"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return status, UNAUTHENTICATED_MESSAGE
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return status, (
                f"{code.name}: {exc.details()}; the bridge waits at most {config.deadline_s:g} s for the gRPC "
                f"server ({DEADLINE_SETTING})"
            )
        if status == 502:
            log.warning("gRPC call failed: %s %s", code.name, exc.details())
        return status, f"{code.name}: {exc.details()}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return 413, f"request body is larger than the limit of {config.max_body_bytes} bytes"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return 405, f"method {exc.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}"
    if isinstance(exc, web.HTTPNotFound):
        return 404, "no such route; see /docs"
    if isinstance(exc, web.HTTPException):
        return exc.status, exc.reason
    log.error("unexpected error in the REST bridge", exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); see the bridge log"


def parser_error(exc: http.HttpProcessingError, max_headers: int) -> tuple[int, str]:
    """HTTP status and message for a request aiohttp's parser refused; never quotes the request's bytes."""
    if isinstance(exc, http.LineTooLong):
        return 431, f"the request line or a header line is longer than {exc.args[1]} bytes"
    if isinstance(exc, http.BadHttpMethod):
        if exc.message.startswith("Received HTTPS traffic"):
            return 400, "this port speaks plain HTTP, not HTTPS"
        return 400, "the request line has an invalid method"
    if isinstance(exc, http.BadStatusLine):
        return 400, "the request line is malformed"
    if isinstance(exc, http.InvalidURLError):
        return 400, "the request target (path and query) is malformed"
    if isinstance(exc, http.InvalidHeader):
        return 400, "a header is malformed"
    # llhttp's reason comes first ("Invalid header value char: ..."); what follows the colon quotes the request.
    reason = exc.message.split("\n", 1)[0].split(":", 1)[0].strip().rstrip(".")
    if reason == "Too many headers received":
        return 431, f"the request has more than {max_headers} header lines"
    if not reason or len(reason) > 80 or QUOTED.search(reason):
        reason = "malformed"
    return 400, f"malformed HTTP request: {reason}"


def payload_error(exc: RequestPayloadError) -> str:
    """The message for a body that arrived but cannot be read as sent (its Content-Encoding, its chunks)."""
    if isinstance(exc.__cause__, http.ContentEncodingError):
        return "the request body does not decode as its Content-Encoding says; send it encoded or drop the header"
    return "the request body is malformed (its chunked Transfer-Encoding or its length)"


def generic_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": message, "status": status}


def cohere_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"message": message}


def error_body(request: web.Request, status: int, message: str) -> tuple[int, dict[str, Any]]:
    shape = request.get(ERROR_SHAPE_KEY)
    if callable(shape):
        return shape(status, message)
    if request.match_info.route.name == "legacy_post":
        # The legacy envelope; HTTP 200 for what the original answered with 200, the real status otherwise.
        body = {"text_pairs": request.get(TEXT_PAIRS_KEY), "rerank_scores": [], "code": -1, "error": message}
        return (200 if status == 400 else status), body
    if request.path.startswith(COHERE_PREFIXES):
        return cohere_error(status, message)
    return generic_error(status, message)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects
        status, message = error_status(exc, request.app[CONFIG_KEY])
    except Exception as exc:
        status, message = error_status(exc, request.app[CONFIG_KEY])
    request[ERROR_STATUS_KEY] = status
    status, body = error_body(request, status, message)
    response = web.json_response(body, status=status)
    if request.content.exception() is not None:  # the parser stopped inside the body: this connection is done
        response.force_close()
    return response
