"""Tokenized pairs as a few flat numpy arrays: what a tokenizer worker sends back (one pickle, no lists of ints)."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from server.tokenize.exact import Encoded
from server.tokenize.prompted import Prompted


@dataclass(frozen=True)
class Packed:
    """Pairs' ids (and attention masks, type ids) end to end; pair i is [offsets[i], offsets[i + 1])."""

    prompted: bool  # Prompted items (ids only), else Encoded
    offsets: np.ndarray
    ids: np.ndarray
    extra: dict[str, np.ndarray]
    forward: Hashable = ()  # Prompted items' forward-pass settings: one request's, the same for every pair
    spans: np.ndarray | None = None  # Prompted items' (query, prompt) token counts, one row each, where they have them

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _flat(rows: Sequence[Sequence[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total)


def pack(items: Sequence[Encoded | Prompted]) -> Packed:
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in items], out=offsets[1:])
    total = int(offsets[-1])
    prompted = bool(items) and isinstance(items[0], Prompted)
    keys = [] if prompted or not items else list(items[0].extra)  # type: ignore[union-attr]
    extra = {k: _flat([e.extra[k] for e in items], total) for k in keys}  # type: ignore[union-attr]
    forward = items[0].forward if prompted else ()  # type: ignore[union-attr]
    spans = np.array([e.spans for e in items], dtype=np.int32) if prompted and items[0].spans else None  # type: ignore[union-attr]
    return Packed(prompted, offsets, _flat([e.input_ids for e in items], total), extra, forward, spans)


def unpack(packed: Packed) -> list[Encoded] | list[Prompted]:
    """The items, each a view into the packed arrays (no copy)."""
    cuts = packed.offsets[1:-1]
    ids = np.split(packed.ids, cuts)
    if packed.prompted:
        spans = [()] * len(ids) if packed.spans is None else [tuple(map(int, r)) for r in packed.spans]
        return [Prompted(i, packed.forward, s) for i, s in zip(ids, spans, strict=True)]
    extra = {k: np.split(v, cuts) for k, v in packed.extra.items()}
    return [Encoded(row, {k: v[i] for k, v in extra.items()}) for i, row in enumerate(ids)]
