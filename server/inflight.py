"""The calls using one model, so that a reload retires the old model only once none is left (server.reload)."""

from __future__ import annotations

import asyncio

from server.errors import STATUS_BY_ERROR, NotReady


class Calls:
    """The calls using one model (from validation to the answer); a retired model is closed once none is left."""

    def __init__(self) -> None:
        self.open = 0
        self.retired = ""  # why the model stopped serving (a reload replaced it), "" while it serves
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> Calls:
        self.open += 1
        self._idle.clear()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.open -= 1
        if self.open == 0:
            self._idle.set()
        if self.retired and isinstance(exc, Exception) and not isinstance(exc, tuple(STATUS_BY_ERROR)):
            # Its batcher or tokenizing closed under it (the retirement's bound passed): the caller may retry.
            raise NotReady(f"{self.retired}; retry") from exc

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
