"""Who may start work now: the concurrency cap, and refusing new work while the server drains."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from server.errors import Busy, Draining

DRAINING_MESSAGE = "the server is draining (shutting down): retry on another replica"
GAP_S = 0.05  # no call arriving for this long: none is on its way through grpc either (loopback to remote: ms)
SETTLE_S = 2.0  # at most this long after the work is done, looking for such a gap
MIN_SETTLE_S = 0.25  # ... and at least this long (if no gap comes first), past the grace period if need be
# Refusals answered at once, per second, after a burst of REFUSAL_BURST; past that rate each waits its turn (at most
# MAX_HOLD_S). Callers that resend at once when refused would otherwise keep the event loop busy refusing, and the
# inference thread, which yields to it, would get a fraction of the CPU (a quarter of one core, bench/retry_storm.py).
REFUSALS_PER_S = 100.0
REFUSAL_BURST = 50
MAX_HOLD_S = 1.0
DEADLINE_MARGIN_S = 0.05  # a held refusal is answered this long before the caller's deadline


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
        self._done = asyncio.Event()  # set while draining once no call or stream is open
        self._last_call = -math.inf
        self._refusal_turn = -math.inf  # when the next refusal beyond the burst may be answered (a virtual clock)

    def touch(self) -> None:
        """A call arrived or ended (refusals included)."""
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
        self._settle()

    def open_stream(self) -> None:
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1
        self._settle()

    def _settle(self) -> None:
        if self.draining and self.in_flight == 0 and self.streams == 0:
            self._done.set()

    def refusal_delay(self, remaining_s: float | None = None) -> float:
        """How long to hold the refusal of a call with `remaining_s` left: 0 until refusals outrun REFUSALS_PER_S."""
        now = time.monotonic()
        burst_s = REFUSAL_BURST / REFUSALS_PER_S
        self._refusal_turn = min(max(self._refusal_turn, now - burst_s) + 1 / REFUSALS_PER_S, now + MAX_HOLD_S)
        delay = self._refusal_turn - now
        if remaining_s is not None:
            delay = min(delay, remaining_s - DEADLINE_MARGIN_S)
        return max(0.0, delay)

    async def hold_refusal(self, remaining_s: float | None = None) -> None:
        """Wait for this refusal's turn (see REFUSALS_PER_S); a drain ends the wait."""
        delay = self.refusal_delay(remaining_s)
        if delay > 0 and not self.draining:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new calls; True once every call and stream in flight has ended, False if `grace_s` passes first.

        Refused callers may keep retrying; they do not hold the drain. Once the work is done it returns at the
        first gap of GAP_S between their calls (at most SETTLE_S later): grpc's own stop, which follows, cancels
        (CANCELLED) a call that reached grpc but not yet this server, so it had better start when none is coming.
        """
        deadline = time.monotonic() + grace_s
        self.draining = True
        self.stopping.set()
        self._settle()
        try:
            if not self._done.is_set():  # with nothing in flight a grace of 0 is no cut-off
                await asyncio.wait_for(self._done.wait(), grace_s)
        except TimeoutError:
            return False
        # Even when the grace is used up: grpc's stop would cut off calls it holds but has not handed over yet.
        settled = max(min(deadline, time.monotonic() + SETTLE_S), time.monotonic() + MIN_SETTLE_S)
        while (now := time.monotonic()) < settled:
            gap_left = self._last_call + GAP_S - now
            if gap_left <= 0:
                break
            await asyncio.sleep(min(gap_left, settled - now))
        return True
