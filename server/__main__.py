"""`python -m server`: run the gRPC reranking service until SIGTERM or SIGINT."""

from __future__ import annotations

import signal

_early_hup: list[int] = []  # SIGHUPs that arrived before serve() took over the signals


def _early_signal(signum: int, frame: object) -> None:
    """Until serve() installs its handlers: SIGHUP is remembered (a reload once loaded), SIGTERM/SIGINT exit."""
    if signum == signal.SIGHUP:
        _early_hup.append(signum)
        return
    raise SystemExit(0)  # nothing is served yet: nothing to drain


if __name__ == "__main__":  # first of all: loading takes seconds, and SIGHUP's default action kills
    for _sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, _early_signal)

import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from server import tracing  # noqa: E402
from server.config import Config, ConfigError, load_config  # noqa: E402
from server.logs import setup_logging  # noqa: E402

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

log = logging.getLogger("server")


async def _start_bridge(config: Config, grpc_target: str, registry: CollectorRegistry | None = None) -> web.AppRunner:
    """The REST bridge in this event loop: HTTPS with the server's certificate when TLS is on.

    It calls this server over a Unix socket only this user can open, so it needs no client certificate of its
    own under mutual TLS; the API key still applies (the bridge forwards the caller's Authorization header).
    """
    from rest_bridge import BridgeConfig, start_bridge

    bridge_config = BridgeConfig(
        grpc_target=grpc_target,
        host=config.host,
        port=config.rest_port,
        deadline_s=config.rest_deadline_s,  # RERANKER_REST_DEADLINE_S, as the standalone bridge's --deadline-s
        log_level=config.log_level,
        legacy1_model=config.legacy1_model,
        legacy2_model=config.legacy2_model,
        auto_truncate=config.rest_auto_truncate,
        header_timeout_s=config.rest_header_timeout_s,
        body_timeout_s=config.rest_body_timeout_s,
        max_connections=config.rest_max_connections,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        tls_client_ca=config.tls_client_ca,
        api_key=config.api_key,  # for the docs page's model list; callers still send their own
        tracing=config.tracing,
    )
    # Its reranker_rest_* metrics join the server's, on --metrics-port.
    runner, _ = await start_bridge(bridge_config, shutdown_timeout=config.grace_s, registry=registry)
    return runner


async def _stop_bridge(runner: web.AppRunner | None) -> None:
    if runner is not None:
        await runner.cleanup()


async def serve(config: Config) -> int:
    from server.app import RerankServer  # torch and FlagEmbedding: seconds, so only once the flags are good

    server = RerankServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reloader.request)  # swap in models whose files changed
    if _early_hup:  # the same as one arriving now: the models are checked for changed files once loaded
        server.reloader.request()
    try:
        await server.bind()
    except ConfigError as exc:  # port in use, unreadable certificate, ...
        log.error("cannot start: %s", exc)
        await server.stop(0)
        return 1
    try:
        bridge = await _start_bridge(config, server.local_target, server.metrics.registry) if config.rest_port else None
    except OSError as exc:  # e.g. the REST port is taken
        log.error("cannot start: REST bridge on %s:%d: %s", config.host, config.rest_port, exc)
        await server.stop(0)
        return 1
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        exc = loading.exception()
        from server.engine.model import ModelLoadError

        if isinstance(exc, ModelLoadError):
            log.error("cannot start: %s", exc)
        else:
            log.error("cannot start: failed to load the model", exc_info=exc)
        await _stop_bridge(bridge)
        await server.stop(0)
        return 1
    await stopping
    log.info("signal received: draining for up to %.1f s", config.grace_s)
    loading.cancel()
    if bridge is not None:  # REST answers 503 with Connection: close from now on; its calls in flight go on
        from rest_bridge.drain import drain_of

        drain_of(bridge).start()
    await server.stop()  # returns once the calls in flight (REST ones included) are answered
    await _stop_bridge(bridge)
    log.info("stopped")
    return 0


def _openmp_waits_passively() -> None:
    """torch's OpenMP threads sleep when they run out of work instead of spinning (unless the caller says otherwise).

    Spinning threads burn the time slice a preempted one needs at every barrier: on 2 shared cores the tiny model
    took 186 ms a call instead of 8, and 1.2 s beside two busy processes (bench/threads.py). libgomp reads this
    once, when torch loads.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> None:
    try:
        config = load_config()  # before torch is imported: --help, --version and mistakes answer at once
    except ConfigError as exc:  # a bad RERANKER_* value (a bad flag already exited, in one line too)
        print(f"python -m server: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _openmp_waits_passively()
    setup_logging(config.log_level, config.log_json)
    if config.tracing:
        try:
            tracing.setup()  # the OpenTelemetry SDK, from the OTEL_* variables
        except tracing.TracingError as exc:
            log.error("cannot start: %s", exc)
            sys.exit(1)
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
