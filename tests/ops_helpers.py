"""Helpers for the operations, security and shutdown tests: a gated engine, free ports, a metrics scrape."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


class GatedEngine:
    """The real engine, but every forward pass first waits for `gate`: holds RPCs in flight on demand."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a forward pass is waiting at the gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def launch(self, batch: Sequence[Any]) -> Callable[[], list[float]]:
        self.entered.set()
        self.gate.wait(60)
        return self._engine.launch(batch)  # type: ignore[no-any-return]


def free_port() -> int:
    """A loopback port free right now (for servers whose port 0 means 'off')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], bool], limit_s: float = 30.0) -> None:
    """Poll `condition` (server state that no event announces) until true; fail after `limit_s`."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on http://127.0.0.1:port/metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
