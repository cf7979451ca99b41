"""A decoder-only (LLM) reranker's inputs exactly as its compute_score builds them: [bos] query, sep passage, sep
prompt."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from server.tokenize.exact import Instructions, ThreadTokenizers
from server.tokenize.flag_compat import prepare_for_model_compat
from server.tokenize.options import Options


@dataclass(frozen=True)
class Prompted:
    """One pair's ids as its family's recipe builds them, and the request's forward-pass settings (Options.forward):
    pairs whose settings differ never share a batch."""

    input_ids: Sequence[int]
    forward: Hashable = ()
    spans: tuple[int, int] = ()  # (query, prompt) tokens at either end, for a model that compresses between them

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptEncoder(ThreadTokenizers):
    """An LLM reranker's tokenizing; needs no weights, so it pickles to a worker process."""

    def __init__(
        self,
        tokenizer: Any,
        instructions: Instructions,
        max_length: int,
        prompt: str,
        bos: bool,
        layered: bool = False,
        spans: bool = False,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.instructions = instructions
        self.default_prompt = prompt
        self.prompt = self._prompt_ids(tokenizer, prompt)
        self.sep = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.bos = [tokenizer.bos_token_id] if bos else []
        self.layered = layered  # the request's layers change the forward pass: items carry them (Options.forward)
        self.spans = spans  # items carry their (query, prompt) token counts (the lightweight reranker compresses)

    @staticmethod
    def _prompt_ids(tok: Any, prompt: str) -> list[int]:
        return tok(prompt, add_special_tokens=False)["input_ids"]

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Prompted]:
        """Tokenize pairs exactly as compute_score does (its `prompt` argument: the request's instruction), in two
        batched tokenizer calls."""
        o = Options.of(options)
        max_length, query_max = o.limits(self.max_length, self.instructions.query_max_length)
        detailed = self.instructions.get_detailed_inputs([list(p) for p in pairs])  # "A: " / "B: " instructions
        tok = self.thread_tokenizer()
        prompt = self._prompt_ids(tok, o.instruction) if o.instruction else self.prompt
        unique = list(dict.fromkeys(q for q, _ in detailed))  # candidates of one query share it
        q_ids = tok(unique, add_special_tokens=False, max_length=query_max, truncation=True)["input_ids"]
        by_query = dict(zip(unique, q_ids, strict=True))
        d_ids = tok([d for _, d in detailed], add_special_tokens=False, max_length=max_length, truncation=True)
        limit = max_length + len(self.sep) + len(prompt)
        forward = o.forward if self.layered else ()
        return [
            self._join(tok, by_query[q], d, limit, prompt, forward)
            for (q, _), d in zip(detailed, d_ids["input_ids"], strict=True)
        ]

    def _join(
        self, tok: Any, query: list[int], passage: list[int], limit: int, prompt: list[int], forward: Any
    ) -> Prompted:
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
        spans = (len(self.bos) + len(query) + len(self.sep), len(self.sep) + len(prompt)) if self.spans else ()
        return Prompted(list(item["input_ids"]) + self.sep + prompt, forward, spans)
