"""Qwen3-Reranker: a Qwen3 causal LM scored by P(yes) over the "no"/"yes" logits after a fixed chat template.

The model card's reference code computes the whole vocabulary's logits at every position, then keeps the last
position's "no" and "yes" entries. Here the last real token's hidden state (already through the final norm) meets a
two-row head folded into one vector, lm_head[yes] - lm_head[no], as vLLM converts the model: the raw score is
logit(yes) - logit(no), whose sigmoid is exactly P(yes) = softmax([no, yes])[1]. The full head is dropped once the
vector is taken (unless it is tied to the embeddings), and no vocabulary-wide logits are ever computed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from server.chunking import Splitter
from server.config import Config
from server.engine.launch import Launcher
from server.engine.llm_model import LLMRerankerModel, load_errors
from server.engine.model import ModelLoadError, _quiet_progress_bars, place
from server.tokenize.chat import QWEN3_RERANKER, ChatEncoder
from server.tokenize.options import Options

log = logging.getLogger(__name__)

YES, NO = "yes", "no"


class ChunkingRules:
    """What server.chunking.Splitter reads of a FlagEmbedding reranker, for a chat-template one: the template's text
    before the document stands as the query (not cut apart: the template is truncated whole), the document as the
    passage."""

    query_max_length = 0

    def __init__(self, tokenizer: Any, encoder: ChatEncoder, instruction: str) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.instruction = instruction

    def get_detailed_inputs(self, pairs: Sequence[Sequence[str]]) -> list[list[str]]:
        return [[self.encoder.texts([(q, "")], self.instruction)[0], p] for q, p in pairs]


class Qwen3RerankerModel(LLMRerankerModel):
    """Qwen3-Reranker (0.6B, 4B, 8B) on one device; scores equal the model card's reference code."""

    family = "qwen3-reranker"
    default_instruction = QWEN3_RERANKER.default_instruction
    options = frozenset({"instruction"})  # the template is truncated whole: no separate query limit

    def __init__(self, config: Config, path: str, name: str | None = None) -> None:
        snapshot = self._begin(config, path, "qwen3-reranker", name)
        self.tokenizer, self.model = self._load(config, path)
        self._check_limits(config, path)
        self._head = self._yes_minus_no(path)
        self.parameters = place(self.model, self.device, self.fp16, snapshot)
        self._head = self._head.to(self.device)
        self.encoder = ChatEncoder(self.tokenizer, config.max_length, QWEN3_RERANKER)
        if config.max_length <= self.encoder.overhead:
            raise ModelLoadError(
                f"--max-length {config.max_length} leaves no room for a pair: Qwen3-Reranker's template alone takes "
                f"{self.encoder.overhead} tokens"
            )
        self._pad_id = self.tokenizer.pad_token_id or 0  # padded positions are masked: any id will do
        self.max_width = config.max_length
        self.launcher = Launcher(self.model, self.device, self._scores, causal=True, buckets=None)

    def refuse(self, o: Options) -> str | None:
        why = super().refuse(o)
        if why is None and o.max_length and o.max_length <= self.encoder.overhead:
            return (
                f"max_length {o.max_length} leaves no room for a pair: model {self.name!r}'s template alone takes "
                f"{self.encoder.overhead} tokens"
            )
        return why

    def splitter(self, o: Options, tokenizer: Any) -> Splitter:
        """Windows that fit beside the template (prefix, suffix, the instruction and query lines) and the query."""
        budget = (o.max_length or self.max_length) - self.encoder.overhead
        return Splitter(ChunkingRules(tokenizer, self.encoder, o.instruction), budget, tokenizer, budget)

    def _load(self, config: Config, path: str) -> tuple[Any, Any]:  # type: ignore[override]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_progress_bars()
        with load_errors(path, "Qwen3"):
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return tokenizer, model

    def _yes_minus_no(self, path: str) -> torch.Tensor:
        """The one-row head, lm_head[yes] - lm_head[no]; the full head is freed where it is not the embeddings."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in (YES, NO)]
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ModelLoadError(f"{path}'s tokenizer has no single {YES!r} and {NO!r} tokens: not Qwen3-Reranker")
        head = self.model.get_output_embeddings()
        weight = head.weight.detach()
        vector = (weight[ids[0]].float() - weight[ids[1]].float()).clone()
        if getattr(head, "bias", None) is not None:
            bias = head.bias.detach()
            self._bias = float(bias[ids[0]] - bias[ids[1]])
        else:
            self._bias = 0.0
        if weight.data_ptr() != self.model.get_input_embeddings().weight.data_ptr():
            self.model.lm_head = torch.nn.Identity()  # vocabulary x hidden weights no forward pass reads
        return vector

    def _scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """logit(yes) - logit(no) at the last position (left padding: every row's last real token), as float32."""
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state[:, -1]
        return hidden.float() @ self._head + self._bias

    def launch(self, batch: Sequence[Any]) -> Any:
        rows, width = self.launcher.shape(len(batch), max(len(e) for e in batch))
        return self.launcher.launch(self._arrays(batch, rows, width), len(batch))
