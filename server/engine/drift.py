"""How far an approximate mode (bf16, fp16, int8) moves a model's scores from fp32, measured on the model it serves.

At load both the fp32 model and the mode score one fixed sample: pairs of texts made of the tokenizer's own
vocabulary (a fixed seed), passages from a few tokens to max_length, so the operator sees the cost on their model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.tokenize.exact import Encoded

SAMPLE_PAIRS = 32
SAMPLE_SEED = 27
_BATCH = 8  # the sample's pairs per forward pass, sorted by length (little padding)

Score = Callable[[Sequence[Encoded]], list[float]]  # one padded batch -> its raw scores


@dataclass(frozen=True)
class Drift:
    """Scores of a mode against fp32's on the drift sample."""

    pairs: int
    max_abs_diff: float
    rank_correlation: float  # Spearman, over the whole sample

    def describe(self) -> str:
        return f"drift max {self.max_abs_diff:.1e}, rank correlation {self.rank_correlation:.4f} on {self.pairs} pairs"


class DriftTooLarge(ValueError):
    """A mode's drift is past the operator's bound."""


def sample_pairs(
    tokenizer: Any, max_length: int, n: int = SAMPLE_PAIRS, seed: int = SAMPLE_SEED
) -> list[tuple[str, str]]:
    """`n` (query, passage) pairs of words from the tokenizer's vocabulary; passages from 4 tokens to about
    `max_length`, spread evenly on a log scale (short ones are as common in use as long ones)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]

    def text(tokens: int) -> str:
        return tokenizer.decode(rng.choices(vocab, k=tokens), skip_special_tokens=True).strip() or "a"

    lengths = np.geomspace(4, max(8, max_length), n).round().astype(int)
    return [(text(rng.randint(3, 16)), text(int(k))) for k in rng.sample(list(lengths), n)]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 1.0 for fewer than two values or constant ones."""
    x, y = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    for value in np.unique(v[np.diff(np.sort(v), prepend=np.nan) == 0]):  # ties share their mean rank
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def score_sample(sample: Sequence[Encoded], score: Score) -> list[float]:
    """The sample's scores in its own order, scored in batches of pairs of similar length."""
    order = sorted(range(len(sample)), key=lambda i: len(sample[i]))
    out = [0.0] * len(sample)
    for start in range(0, len(order), _BATCH):
        chunk = order[start : start + _BATCH]
        for i, s in zip(chunk, score([sample[i] for i in chunk]), strict=True):
            out[i] = s
    return out


def compare(reference: Sequence[float], approximate: Sequence[float]) -> Drift:
    diff = np.abs(np.asarray(reference, dtype=np.float64) - np.asarray(approximate, dtype=np.float64))
    return Drift(len(reference), float(diff.max(initial=0.0)), spearman(reference, approximate))


def check_bound(drift: Drift, mode: str, max_drift: float, min_rank_correlation: float) -> None:
    """DriftTooLarge, one line, when `drift` is past either bound (0 and -1: no bound)."""
    if max_drift and drift.max_abs_diff > max_drift:
        raise DriftTooLarge(
            f"--dtype {mode} moves this model's scores by up to {drift.max_abs_diff:.2e} from fp32 on the drift "
            f"sample, above --max-drift {max_drift:g}: serve it in fp32, or raise the bound"
        )
    if drift.rank_correlation < min_rank_correlation:
        raise DriftTooLarge(
            f"--dtype {mode} ranks the drift sample with a correlation of {drift.rank_correlation:.4f} to fp32, below "
            f"--min-rank-correlation {min_rank_correlation:g}: serve it in fp32, or lower the bound"
        )
