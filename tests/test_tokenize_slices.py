"""How a request's pairs are cut into tokenizing slices, and how slices of several requests share the threads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.service import TOKENIZE_SLICE, TOKENIZE_SLICE_CHARS, Scoring, slices


def test_slices_are_bounded_in_pairs_and_characters() -> None:
    short = [("q", "a passage")] * 300
    assert slices(short) == [slice(0, 128), slice(128, 256), slice(256, 300)]
    long = [("q", "x" * (TOKENIZE_SLICE_CHARS // 4))] * 10  # with its query each is over a quarter: 3 a slice
    cuts = slices(long)
    assert all(sum(len(q) + len(p) for q, p in long[c]) <= TOKENIZE_SLICE_CHARS for c in cuts)
    assert [c.stop - c.start for c in cuts] == [3, 3, 3, 1]
    assert slices([("q", "x" * (2 * TOKENIZE_SLICE_CHARS))]) == [slice(0, 1)]  # one pair over the budget: alone
    assert slices(short[:TOKENIZE_SLICE]) == [slice(0, TOKENIZE_SLICE)]


class _OneThread:
    """A Tokenizing stand-in: one thread; records whose slice it tokenized, and holds the first until released."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1)
        self.parallel = 1
        self.order: list[str] = []
        self.first = threading.Event()
        self.go = threading.Event()

    def encode(self, pairs: list[tuple[str, str]], max_length: Any) -> list[Any]:
        if not self.order:
            self.first.set()
            assert self.go.wait(10)
        self.order.append(pairs[0][0])
        return list(pairs)


async def test_a_small_request_is_tokenized_after_one_slice_of_a_large_one() -> None:
    t = _OneThread()
    scoring = Scoring(engine=None, batcher=None, tokenizing=t, batching=None)  # type: ignore[arg-type]

    async def drain(query: str, count: int) -> int:
        return sum([len(part) async for part in scoring.encode([(query, "p")] * count, None)])

    large = asyncio.ensure_future(drain("large", 10 * TOKENIZE_SLICE))
    await asyncio.to_thread(t.first.wait, 10)  # the large request's first slice is being tokenized
    small = asyncio.ensure_future(drain("small", 1))
    await asyncio.sleep(0)  # one turn of the loop: the small request's task runs up to queuing its slice
    t.go.set()
    assert await small == 1 and await large == 10 * TOKENIZE_SLICE
    assert t.order.index("small") <= 2, t.order
    t.executor.shutdown()
