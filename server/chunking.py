"""Long passages: cut one too long for a (query, passage) pair into overlapping text windows that each fit.

Works on text with the model's own tokenizer and FlagReranker's rules (query cut to 3/4 of max_length; the
pair is special tokens + query + passage, after FlagEmbedding's decode/re-encode round trip), and checks
every window with those rules. Each window then travels as an ordinary pair through the usual
encode + batcher path, so its score is exactly `compute_score([[query, window]])`; a passage scores as its
best window. The first window is the passage itself, which FlagReranker truncates to its head: so a passage
that fits scores exactly as when truncated, and a long one never scores below its truncated self.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from FlagEmbedding.utils.tokenizer_compat import prepare_for_model_compat

from server.errors import InvalidRequest

_MARGIN = 2  # tokens kept free in a first cut; windows that still do not fit are cut again, shorter
_MAX_REFITS = 8


@dataclass(frozen=True)
class Windows:
    """The pairs to score and, for each, the index of the request pair (passage) it came from."""

    pairs: list[tuple[str, str]]
    owners: list[int]

    def best(self, scores: Sequence[float], count: int) -> list[float]:
        """Each passage's score: the maximum over its windows."""
        out = [-float("inf")] * count
        for owner, score in zip(self.owners, scores, strict=True):
            out[owner] = max(out[owner], score)
        return out


class Splitter:
    """Cuts passages for one engine (a FlagReranker and its fast tokenizer) at a given max_length."""

    def __init__(self, flag: Any, max_length: int, tokenizer: Any = None, query_max: int = 0) -> None:
        self.flag = flag
        self.tokenizer = tokenizer or flag.tokenizer  # the engine's copy for this thread, where it has one
        self.max_length = max_length
        self.query_max = query_max or flag.query_max_length or max_length * 3 // 4
        self.special = self.tokenizer.num_special_tokens_to_add(pair=True)
        self._queries: dict[str, list[int]] = {}

    def _query_ids(self, query: str) -> list[int]:
        ids = self._queries.get(query)
        if ids is None:
            ids = self.tokenizer(query, add_special_tokens=False, max_length=self.query_max, truncation=True)
            ids = self._queries[query] = ids["input_ids"]
        return ids

    def _detailed(self, query: str, passage: str) -> tuple[str, str]:
        """The texts FlagReranker tokenizes (with the model's instructions, if it has any)."""
        q, p = self.flag.get_detailed_inputs([[query, passage]])[0]
        return q, p

    def fits(self, query: str, passage: str) -> bool:
        """True when FlagReranker would feed the whole passage to the model, nothing cut off."""
        return self._excess(query, passage) <= 0

    def _excess(self, query: str, passage: str) -> int:
        """Tokens by which the untruncated pair is longer than max_length (<= 0: it fits)."""
        q, p = self._detailed(query, passage)
        p_ids = self.tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"]
        if len(p_ids) > self.max_length:  # FlagReranker cuts the passage to max_length before pairing
            return len(p_ids) - self.max_length
        pair = prepare_for_model_compat(
            self.tokenizer, self._query_ids(q), p_ids, truncation=False, padding=False, verbose=False
        )
        return len(pair["input_ids"]) - self.max_length

    def split(self, query: str, passage: str, keep_end_only: bool = False) -> list[str]:
        """The passage (truncated to its head when scored), then overlapping windows that each fit with the query
        and together cover the rest; with keep_end_only, just the window that ends where the passage does."""
        if self.fits(query, passage):
            return [passage]
        q, _ = self._detailed(query, "")
        encoded = self.tokenizer(passage, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = encoded["offset_mapping"]
        size = self.max_length - self.special - len(self._query_ids(q)) - _MARGIN
        for _ in range(_MAX_REFITS):
            if size < 1:
                break
            windows = _cut(passage, offsets, size, keep_end_only)
            excess = max((self._excess(query, w) for w in windows), default=0)
            if excess <= 0:
                return (windows or [passage]) if keep_end_only else [passage, *windows]
            size -= excess + _MARGIN
        raise InvalidRequest(
            f"max_length {self.max_length} leaves no room for a passage window beside the query "
            f"({len(self._query_ids(q))} tokens) and {self.special} special tokens; "
            "use a larger max_length, a shorter query, or truncate"
        )


def _starts(n: int, size: int) -> list[int]:
    """Window starts: a quarter of each window overlaps the next; the last window ends at the passage's end."""
    if n <= size:
        return [0]
    stride = max(1, size - size // 4)
    return [*range(0, n - size, stride), n - size]


def _cut(text: str, offsets: Sequence[tuple[int, int]], size: int, keep_end_only: bool) -> list[str]:
    starts = _starts(len(offsets), size)
    if keep_end_only:
        starts = starts[-1:]
    elif len(starts) > 1:
        starts = starts[1:]  # the passage itself, truncated to its head, stands for the first window
    windows = []
    for s in starts:
        e = min(s + size, len(offsets))
        window = text[offsets[s][0] : offsets[e - 1][1]]
        if window.strip():
            windows.append(window)
    return windows


@dataclass(frozen=True)
class Limit:
    count: int
    name: str  # how an error names it, e.g. "--max-windows-per-doc 64"


@dataclass(frozen=True)
class WindowPlan:
    keep_end_only: bool  # just the window that ends where the passage ends (truncate on the left)
    per_doc: Limit
    per_request: Limit
    name: str  # how an error names passage i: a format string, e.g. "candidates[{}]"


def split_passages(splitter: Splitter, pairs: Sequence[tuple[str, str]], plan: WindowPlan) -> Windows:
    """Windows of every pair's passage, or InvalidRequest naming the passage and the limit it breaks."""
    out: list[tuple[str, str]] = []
    owners: list[int] = []
    for i, (query, passage) in enumerate(pairs):
        windows = splitter.split(query, passage, plan.keep_end_only)
        if len(windows) > plan.per_doc.count:
            raise InvalidRequest(
                f"{plan.name.format(i)} needs {len(windows)} windows to be scored whole; the limit is "
                f"{plan.per_doc.count} windows per passage ({plan.per_doc.name}); shorten it, raise the limit or "
                "truncate"
            )
        out.extend((query, w) for w in windows)
        owners.extend([i] * len(windows))
        if len(out) > plan.per_request.count:
            raise InvalidRequest(
                f"the request needs more than {plan.per_request.count} windows; the limit is "
                f"{plan.per_request.count} windows per request ({plan.per_request.name}); send fewer or shorter "
                "passages, or truncate"
            )
    return Windows(out, owners)
