"""Shape buckets: a batch's width and row count padded up to one of a few sizes, so a device meets only shapes it
was warmed on (a first shape costs ~90 ms on CUDA: kernel choice, allocator growth) and CUDA graphs can be captured
once per shape."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

WIDTH_STEP = 64  # widths: 32, then multiples of 64 up to the longest input
MIN_ROWS = 8  # row counts: powers of two from 8 up to the batch size


@dataclass(frozen=True)
class Buckets:
    widths: tuple[int, ...]  # ascending; the last is the longest input
    rows: tuple[int, ...]  # ascending; the last is the batch size
    max_tokens: int  # a bucket is used only where rows x width fits this budget

    @classmethod
    def fit(cls, max_width: int, batch_size: int, max_tokens: int, multiple: int = 1) -> Buckets:
        """Buckets for inputs of up to `max_width` tokens (widths rounded up to `multiple`), batches of up to
        `batch_size` pairs and `max_tokens` padded tokens."""
        up = lambda n: -(-n // multiple) * multiple  # noqa: E731
        widths = sorted({up(w) for w in (32, *range(WIDTH_STEP, max_width, WIDTH_STEP)) if w < max_width})
        rows, r = [], MIN_ROWS
        while r < batch_size:
            rows.append(r)
            r *= 2
        return cls((*widths, up(max_width)), (*rows, batch_size), max_tokens)

    def shape(self, rows: int, width: int) -> tuple[int, int]:
        """The bucket (rows, width) for a batch of `rows` pairs padded to `width`; a dimension past the largest
        bucket, or a bucket over the token budget, stays exact."""
        w = self._up(self.widths, width)
        r = self._up(self.rows, rows)
        if r * w > self.max_tokens:
            r = rows
        return r, w

    def shapes(self) -> list[tuple[int, int]]:
        """Every bucket within the token budget, largest first (the order to warm and capture them in)."""
        return sorted(((r, w) for r in self.rows for w in self.widths if r * w <= self.max_tokens), reverse=True)

    @staticmethod
    def _up(sizes: tuple[int, ...], n: int) -> int:
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else n
