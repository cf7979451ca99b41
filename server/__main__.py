"""`python -m server`: run the gRPC reranking service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from server.app import RerankServer
from server.config import Config, ConfigError, load_config
from server.logs import setup_logging

log = logging.getLogger("server")


async def serve(config: Config) -> int:
    server = RerankServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.bind()
    except ConfigError as exc:  # port in use, unreadable certificate, ...
        log.error("cannot start: %s", exc)
        await server.stop(0)
        return 1
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        exc = loading.exception()
        from server.model import ModelLoadError

        if isinstance(exc, ModelLoadError):
            log.error("cannot start: %s", exc)
        else:
            log.error("cannot start: failed to load the model", exc_info=exc)
        await server.stop(0)
        return 1
    await stopping
    log.info("signal received: draining for up to %.1f s", config.grace_s)
    loading.cancel()
    await server.stop()
    log.info("stopped")
    return 0


def main() -> None:
    config = load_config()
    setup_logging(config.log_level, config.log_json)
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
