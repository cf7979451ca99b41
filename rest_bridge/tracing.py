"""The bridge's part of a trace: an HTTP server span continuing the caller's W3C `traceparent` (the middleware, in the
app only while tracing is on: server/tracing.py), and the context passed on to the gRPC server as metadata."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from clients._tracing import context_metadata
from server import tracing

TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context


def trace_metadata(request: web.Request) -> list[tuple[str, str]]:
    """The trace context for the gRPC call: the bridge's own span's while tracing is on; otherwise the caller's as it
    came, for a server that traces (a malformed header is dropped, as W3C trace context says)."""
    if tracing.on():
        return list(context_metadata())
    carried = ((name, request.headers.get(name, "")) for name in TRACE_HEADERS)
    return [(name, value) for name, value in carried if value and value.isascii() and value.isprintable()]


@web.middleware
async def trace_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Status, StatusCode

    info = request.match_info.route.resource
    route = info.canonical if info is not None else request.path
    attributes = {"http.request.method": request.method, "http.route": route, "url.path": request.path}
    if "x-request-id" in request.headers:
        attributes["reranker.request_id"] = request.headers["x-request-id"]
    with tracing.tracer().start_as_current_span(
        f"{request.method} {route}",
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,  # a redirect raised as an exception is no error
    ) as span:
        status = 0  # stays 0 if the caller went away (cancelled)
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:  # redirects and the few errors aiohttp raises as responses
            status = exc.status
            raise
        except Exception as exc:  # not answered by the error middleware: aiohttp answers 500
            status = 500
            span.record_exception(exc)
            raise
        finally:
            if status:
                span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        return response
