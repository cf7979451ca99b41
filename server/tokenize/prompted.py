"""A decoder-only (LLM) reranker's inputs exactly as its compute_score builds them: [bos] query, sep passage, sep
prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.tokenize.exact import Instructions, ThreadTokenizers
from server.tokenize.flag_compat import prepare_for_model_compat


@dataclass(frozen=True)
class Prompted:
    """One pair's ids as compute_score builds them: [bos] query, sep passage, sep prompt."""

    input_ids: Sequence[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptEncoder(ThreadTokenizers):
    """An LLM reranker's tokenizing; needs no weights, so it pickles to a worker process."""

    def __init__(self, tokenizer: Any, instructions: Instructions, max_length: int, prompt: str, bos: bool) -> None:
        super().__init__(tokenizer, max_length)
        self.instructions = instructions
        self.prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.sep = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.bos = [tokenizer.bos_token_id] if bos else []

    def encode(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> list[Prompted]:
        """Tokenize pairs exactly as compute_score does, in two batched tokenizer calls."""
        max_length = max_length or self.max_length
        query_max = self.instructions.query_max_length or max_length * 3 // 4
        detailed = self.instructions.get_detailed_inputs([list(p) for p in pairs])  # "A: " / "B: " instructions
        tok = self.thread_tokenizer()
        unique = list(dict.fromkeys(q for q, _ in detailed))  # candidates of one query share it
        q_ids = tok(unique, add_special_tokens=False, max_length=query_max, truncation=True)["input_ids"]
        by_query = dict(zip(unique, q_ids, strict=True))
        d_ids = tok([d for _, d in detailed], add_special_tokens=False, max_length=max_length, truncation=True)
        limit = max_length + len(self.sep) + len(self.prompt)
        return [self._join(tok, by_query[q], d, limit) for (q, _), d in zip(detailed, d_ids["input_ids"], strict=True)]

    def _join(self, tok: Any, query: list[int], passage: list[int], limit: int) -> Prompted:
        item = prepare_for_model_compat(
            tok,
            self.bos + query,
            self.sep + passage,
            truncation="only_second",
            max_length=limit,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            add_special_tokens=False,
        )
        return Prompted(list(item["input_ids"]) + self.sep + self.prompt)
