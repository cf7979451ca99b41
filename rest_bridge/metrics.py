"""REST metrics: requests by route, dialect, HTTP status and outcome, and latency per route.

In `python -m server --rest-port` they join the server's registry (its `--metrics-port`); the standalone bridge
serves its own registry on `--metrics-port`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from rest_bridge.errors import DIALECT_KEY, ERROR_STATUS_KEY
from rest_bridge.openapi import ROUTE_DIALECTS
from server.metrics import LATENCY_BUCKETS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before its answer


def outcome(status: int) -> str:
    return "ok" if status < 400 else "client_error" if status < 500 else "server_error"


class RestMetrics:
    """The bridge's reranker_rest_* metrics in `registry`; `middleware` counts every routed request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "reranker_rest_requests",
            "REST requests answered, by route, dialect, HTTP status sent and outcome (legacy 1's code -1 is an error)",
            ["route", "dialect", "status", "outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "reranker_rest_request_seconds",
            "Time to answer a REST request, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # redirects, and what the error middleware lets through
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"  # bounded: never the raw path
            dialect = request.get(DIALECT_KEY) or ROUTE_DIALECTS.get(route, "none")
            self.requests.labels(route, dialect, str(status), outcome(request.get(ERROR_STATUS_KEY, status))).inc()
            self.seconds.labels(route).observe(time.perf_counter() - start)
