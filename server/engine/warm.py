"""Readying a loaded model for serving: its masks checked, warmed up, and on CUDA every shape bucket warmed (and
captured as a CUDA graph) before SERVING, so no request pays a first-shape cost."""

from __future__ import annotations

import logging
import time
from typing import Any

from server.engine.buckets import Buckets
from server.tokenize.exact import Encoded
from server.tokenize.prompted import Prompted

log = logging.getLogger(__name__)

WARM_LIMIT_S = 120.0  # bounded start-up: buckets not warmed by then are warmed by their first batch
_LONG = " ".join(["a passage of many words to warm up every width of the model"] * 64)


def _cut(item: Any, n: int) -> Any:
    """`item` cut to its first `n` tokens (a warm-up input of a chosen length)."""
    if isinstance(item, Prompted):
        spans = item.spans
        if spans:  # the query and prompt counts must still fit in the cut input
            query = min(spans[0], n)
            spans = (query, min(spans[1], n - query))
        return Prompted(list(item.input_ids[:n]), item.forward, spans)
    assert isinstance(item, Encoded)
    return Encoded(list(item.input_ids[:n]), {k: list(v[:n]) for k, v in item.extra.items()})


def _batch(sample: Any, rows: int, width: int) -> list[Any]:
    """`rows` inputs of `width` tokens and less, so the batch has padding (the masked path every bucket takes)."""
    longest = min(width, len(sample))
    return [_cut(sample, max(1, longest - i % 8)) for i in range(rows)]


def prepare(engine: Any, batching: Any, cuda_graphs: str) -> str:
    """Check the engine's prepared masks, warm it up, and on CUDA pad batches to shape buckets, warm every bucket
    (within WARM_LIMIT_S) and capture them as CUDA graphs (`cuda_graphs`: auto, on, off). Returns what it did, for
    the startup line."""
    launcher = engine.launcher
    sample = engine.encode([("warm up", _LONG)], engine.max_length)[0]
    launcher.check_masks(engine._arrays(_batch(sample, 4, len(sample)), 4, len(sample)))
    if not launcher.cuda:
        engine.warm_up(batching.batch_size)
        return "exact widths (cpu)" + (", graphs off (CUDA only)" if cuda_graphs == "on" else "")
    multiple = getattr(engine, "pad_multiple", 1)
    buckets = Buckets.fit(engine.max_width, batching.batch_size, batching.max_batch_tokens, multiple)
    launcher.buckets = buckets
    engine.warm_up(batching.batch_size)
    start, shapes, warmed = time.perf_counter(), buckets.shapes(), []
    for rows, width in shapes:
        if time.perf_counter() - start > WARM_LIMIT_S:
            log.warning("warmed %d of %d shape buckets in %.0f s; the rest warm on first use", len(warmed),
                        len(shapes), WARM_LIMIT_S)  # fmt: skip
            break
        arrays = engine._arrays(_batch(sample, rows, width), rows, width)
        launcher.launch(arrays, rows)()
        warmed.append(arrays)
    graphs = launcher.capture(cuda_graphs, warmed)
    return (
        f"{len(warmed)}/{len(shapes)} buckets warmed in {time.perf_counter() - start:.1f} s "
        f"(widths {','.join(map(str, buckets.widths))}; rows {','.join(map(str, buckets.rows))}), graphs {graphs}"
    )
