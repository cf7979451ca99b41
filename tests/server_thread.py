"""A RerankServer on its own event loop in a background thread, for blocking clients and subprocesses."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from server.app import RerankServer
from server.config import Config

T = TypeVar("T")


class ServerThread:
    """Starts at once; `stop()` stops the server, the loop and the thread."""

    def __init__(self, config: Config, engine: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: RerankServer = self.run(self._start(config, engine))

    @staticmethod
    async def _start(config: Config, engine: Any) -> RerankServer:
        srv = RerankServer(config, engine=engine)  # built on the thread's loop, where grpc.aio runs it
        await srv.start()
        return srv

    @property
    def port(self) -> int:
        return self.server.port

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        try:
            self.run(self.server.stop(0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
