"""Draining the REST port on SIGTERM: every new request gets 503 with `Connection: close`, also on a kept-alive
connection (which would otherwise be dropped at stop), while the requests already in flight finish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from rest_bridge.errors import error_body

DRAINING_MESSAGE = "the server is draining (shutting down): retry on another replica"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Drain:
    """Counts the requests in flight; once `start()` is called, refuses new ones."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self.draining = True

    async def wait(self, timeout_s: float) -> bool:
        """True once no request is in flight, False if `timeout_s` passes first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.draining:
            status, body = error_body(request, 503, DRAINING_MESSAGE)
            response = web.json_response(body, status=status)
            response.force_close()  # the client's next request goes to a new connection, and so elsewhere
            return response
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()


DRAIN_KEY = web.AppKey("drain", Drain)


def drain_of(runner: web.AppRunner) -> Drain:
    """The Drain of the app `runner` serves."""
    app = runner.app
    assert app is not None
    return app[DRAIN_KEY]
