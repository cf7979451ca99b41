"""`python -m rest_bridge --grpc-target HOST:PORT --port 6009`: serve the REST bridge until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from prometheus_client import CollectorRegistry, start_http_server

from rest_bridge.app import start_bridge
from rest_bridge.config import BridgeConfig, load_bridge_config
from rest_bridge.drain import drain_of
from server import tracing

SHUTDOWN_TIMEOUT_S = 10.0  # how long requests in flight at SIGTERM may still take


async def serve(config: BridgeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    metrics = (
        start_http_server(config.metrics_port, addr=config.host, registry=registry) if config.metrics_port else None
    )
    runner, _ = await start_bridge(config, shutdown_timeout=SHUTDOWN_TIMEOUT_S, registry=registry)
    try:
        await stop.wait()
        drain_of(runner).start()  # new requests get 503 with Connection: close
        await drain_of(runner).wait(SHUTDOWN_TIMEOUT_S)
    finally:
        await runner.cleanup()
        if metrics is not None:
            metrics[0].shutdown()


def main() -> None:
    config = load_bridge_config()
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if config.tracing:
        try:
            tracing.setup()  # the OpenTelemetry SDK, from the OTEL_* variables
        except tracing.TracingError as exc:
            sys.exit(f"cannot start the REST bridge: {exc}")
    try:
        asyncio.run(serve(config))
    except OSError as exc:  # e.g. the port is taken
        sys.exit(f"cannot start the REST bridge on {config.host}:{config.port}: {exc}")


if __name__ == "__main__":
    main()
