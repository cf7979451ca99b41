"""Who may start work now: the concurrency cap, and refusing new work while the server drains."""

from __future__ import annotations

import asyncio
import math
import time

from server.errors import Busy, Draining

DRAINING_MESSAGE = "the server is shutting down; retry on another replica"


class Admission:
    """Counts unary RPCs and RerankStream requests in flight (the cap counts both) and open streams.

    Shared by the interceptor (unary calls, stream start) and RerankStream (each request of a stream).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap  # 0 = no cap
        self.in_flight = 0
        self.streams = 0
        self.draining = False
        self.stopping = asyncio.Event()  # set when draining starts: open streams stop reading
        self._last_call = -math.inf

    def touch(self) -> None:
        """A call arrived or ended: drain waits for a quiet moment after the last one."""
        self._last_call = time.monotonic()

    def check_open(self) -> None:
        if self.draining:
            raise Draining(DRAINING_MESSAGE)

    def enter(self) -> None:
        """Count one unit of work in flight, or raise Busy past the cap."""
        if self.cap and self.in_flight >= self.cap:
            raise Busy(f"{self.cap} requests are in flight, the limit (--max-concurrent-rpcs); retry with backoff")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def drain(self, grace_s: float, quiet_s: float = 0.25) -> None:
        """Refuse new calls; return once nothing has run or arrived for `quiet_s`, or after `grace_s`.

        grpc's own stop() cancels calls that reached the server but not yet the servicer; refusing them here
        first, until callers have gone elsewhere, gives each a clean UNAVAILABLE instead.
        """
        self.draining = True
        self.stopping.set()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            idle = self.in_flight == 0 and self.streams == 0
            if idle and time.monotonic() - self._last_call >= quiet_s:
                return
            await asyncio.sleep(0.02)
