"""A request's own settings for its model: token limits and instruction (tokenizing), layers (the forward pass)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """Per-request settings; zero or empty means the model's own. Picklable: it travels to tokenizer workers."""

    max_length: int = 0  # tokens per pair
    query_max_length: int = 0  # tokens of the query inside a pair (FlagReranker's query_max_length)
    instruction: str = ""  # the instruction-following families' task text
    cutoff_layers: tuple[int, ...] = ()  # layer-wise / lightweight: the layers whose heads score
    compress_ratio: int = 0  # lightweight: token compression ratio
    compress_layers: tuple[int, ...] = ()  # lightweight: the layers that compress

    @classmethod
    def of(cls, value: Options | int | None) -> Options:
        """Options from options, or from a bare max_length (tools and tests), or the defaults from None."""
        if isinstance(value, Options):
            return value
        return cls(max_length=value or 0)

    @property
    def forward(self) -> Hashable:
        """What changes the forward pass itself: requests that differ here may share no batch."""
        return (self.cutoff_layers, self.compress_ratio, self.compress_layers)

    def limits(self, default_max: int, default_query_max: int | None) -> tuple[int, int]:
        """(max_length, query_max_length) for this request: its own, else the model's (query: 3/4 of max_length,
        as FlagReranker computes it)."""
        max_length = self.max_length or default_max
        query_max = self.query_max_length or default_query_max or max_length * 3 // 4
        return max_length, query_max

    def unsupported(self, accepted: frozenset[str]) -> list[str]:
        """The options this request sets that a model accepting `accepted` does not take."""
        asked = {
            "instruction": self.instruction,
            "query_max_length": self.query_max_length,
            "cutoff_layers": self.cutoff_layers,
            "compress_ratio": self.compress_ratio,
            "compress_layers": self.compress_layers,
        }
        return sorted(k for k, v in asked.items() if v and k not in accepted)


def refusal(model: str, family: str, o: Options, accepted: frozenset[str]) -> str | None:
    """Why a model of `family` cannot honour options `o` (None: it can)."""
    extra = o.unsupported(accepted)
    if not extra:
        return None
    takes = ", ".join(sorted(accepted)) or "none of the per-request model options"
    return f"model {model!r} is a {family} reranker: it does not take {', '.join(extra)} (it takes {takes})"


DEFAULT = Options()
