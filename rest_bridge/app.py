"""The aiohttp application: routes, the error middleware, Swagger UI, and the gRPC channel's lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry
from swagger_ui_bundle import swagger_ui_path

from rest_bridge import handlers
from rest_bridge.config import BridgeConfig
from rest_bridge.drain import DRAIN_KEY, Drain
from rest_bridge.errors import CONFIG_KEY, error_middleware
from rest_bridge.guard import LINGER_S, GuardedSite, body_middleware, guard_routes, server_header, ssl_context
from rest_bridge.metrics import RestMetrics
from rest_bridge.openapi import document
from rest_bridge.routes import add_routes
from server import tracing

log = logging.getLogger(__name__)

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Reranker REST bridge</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body>
</html>
"""


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document(await request.app[handlers.UPSTREAM_KEY].described_models()))


async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/docs")


METRICS_KEY = web.AppKey("metrics", RestMetrics)


def create_app(config: BridgeConfig, registry: CollectorRegistry | None = None) -> web.Application:
    """The bridge app; its gRPC channel opens on startup and closes on cleanup. Metrics go into `registry`."""
    metrics = RestMetrics(registry or CollectorRegistry())  # outermost: it counts the drain's refusals too
    drain = Drain()  # then the drain: a draining bridge refuses before it reads a body
    middlewares = [metrics.middleware, drain.middleware, error_middleware, body_middleware(config.body_timeout_s)]
    if tracing.on():  # outermost: a refused or failed request has its span too
        from rest_bridge.tracing import trace_middleware

        middlewares.insert(0, trace_middleware)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[CONFIG_KEY] = config
    app[DRAIN_KEY] = drain
    app[METRICS_KEY] = metrics

    async def upstream(app: web.Application) -> AsyncIterator[None]:
        app[handlers.UPSTREAM_KEY] = handlers.Upstream(config)
        yield
        await app[handlers.UPSTREAM_KEY].close()

    app.cleanup_ctx.append(upstream)
    app.router.add_post("/bge-reranker-base/post", handlers.legacy_post, name="legacy_post")
    add_routes(app.router)  # every rerank and score dialect (rest_bridge/routes.py)
    app.router.add_get("/info", handlers.info)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/models", handlers.models)  # Infinity's path
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/", root)
    app.router.add_get("/docs", docs)
    app.router.add_static("/docs/static", swagger_ui_path)
    app.router.add_get("/openapi.json", openapi)
    guard_routes(app)
    app.on_response_prepare.append(server_header)
    return app


async def start_bridge(
    config: BridgeConfig, shutdown_timeout: float = 10.0, registry: CollectorRegistry | None = None
) -> tuple[web.AppRunner, int]:
    """Serve the bridge on config.host:config.port; returns the runner (call `cleanup()`) and the bound port."""
    runner = web.AppRunner(
        create_app(config, registry),
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=config.header_timeout_s,  # closes a connection whose request headers are late (guard.py)
        lingering_time=LINGER_S,
    )
    await runner.setup()
    tls = ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    site = GuardedSite(
        runner,
        config.host,
        config.port,
        max_connections=config.max_connections,
        handshake_timeout_s=config.header_timeout_s,
        ssl_context=tls,
    )
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if tls else "http"
    log.info("REST bridge on %s://%s:%d -> gRPC %s", scheme, config.host, port, config.grpc_target)
    return runner, port
