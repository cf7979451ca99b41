"""Chat-template yes/no rerankers: Qwen3-Reranker (P(yes) over the "no"/"yes" logits) and mxbai-rerank v2 (a Qwen2
LM, "1" against "0"), each a causal LM scored at the last position after its fixed template (server.tokenize.chat).

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
from server.tokenize.chat import MXBAI_RERANK_V2, QWEN3_RERANKER, ChatEncoder, ChatTemplate
from server.tokenize.options import Options

log = logging.getLogger(__name__)


class ChunkingRules:
    """What server.chunking.Splitter reads of a FlagEmbedding reranker, for a chat-template one: the template's text
    before the document stands as the query, the document's text as the passage (ChatEncoder.halves)."""

    query_max_length = 0

    def __init__(self, tokenizer: Any, encoder: ChatEncoder, instruction: str) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.instruction = instruction

    def get_detailed_inputs(self, pairs: Sequence[Sequence[str]]) -> list[list[str]]:
        return [list(self.encoder.halves(q, p, self.instruction)) for q, p in pairs]


class Qwen3RerankerModel(LLMRerankerModel):
    """Qwen3-Reranker (0.6B, 4B, 8B) on one device; scores equal the model card's reference code."""

    family = "qwen3-reranker"
    title = "Qwen3-Reranker"  # how messages name the family
    template: ChatTemplate = QWEN3_RERANKER
    options = frozenset({"instruction"})  # the template's own query limit, if any: no separate one per request

    def __init__(self, config: Config, path: str, name: str | None = None) -> None:
        snapshot = self._begin(config, path, self.family, name)
        self.default_instruction = self.template.default_instruction
        self.tokenizer, self.model = self._load(config, path)
        self._check_limits(config, path)
        self._head = self._yes_minus_no(path)
        self.parameters = place(self.model, self.device, self.fp16, snapshot)
        self._head = self._head.to(self.device)
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.encoder = ChatEncoder(self.tokenizer, config.max_length, self.template, limit)
        if self.encoder.room(config.max_length) < 1:
            raise ModelLoadError(
                f"--max-length {config.max_length} leaves no room for a pair: {self.title}'s template alone takes "
                f"{self.encoder.overhead} tokens"
            )
        self._pad_id = self.tokenizer.pad_token_id or 0  # padded positions are masked: any id will do
        self.max_width = self.encoder.width(config.max_length)
        self.launcher = Launcher(self.model, self.device, self._scores, causal=True, buckets=None)

    def refuse(self, o: Options) -> str | None:
        why = super().refuse(o)
        if why is None and o.max_length and self.encoder.room(o.max_length) < 1:
            return (
                f"max_length {o.max_length} leaves no room for a pair: model {self.name!r}'s template alone takes "
                f"{self.encoder.overhead} tokens"
            )
        return why

    def splitter(self, o: Options, tokenizer: Any) -> Splitter:
        """Windows that fit beside the template (prefix, suffix, the instruction and query lines) and the query."""
        max_length = o.max_length or self.max_length
        rules = ChunkingRules(tokenizer, self.encoder, o.instruction)
        return Splitter(rules, self.encoder.room(max_length), tokenizer, self.encoder.query_room(max_length))

    def _load(self, config: Config, path: str) -> tuple[Any, Any]:  # type: ignore[override]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_progress_bars()
        with load_errors(path, self.title):
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return tokenizer, model

    def _yes_minus_no(self, path: str) -> torch.Tensor:
        """The one-row head, lm_head[yes] - lm_head[no]; the full head is freed where it is not the embeddings."""
        yes, no = self.template.answers
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in (yes, no)]
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ModelLoadError(f"{path}'s tokenizer has no single {yes!r} and {no!r} tokens: not {self.title}")
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


class MxbaiRerankV2Model(Qwen3RerankerModel):
    """mxbai-rerank-base-v2 / -large-v2 (Qwen2); raw scores equal the `mxbai-rerank` package's MxbaiRerankV2.predict.
    max_length counts the query and document tokens, as the package's does; the template comes on top."""

    family = "mxbai-rerank-v2"
    title = "mxbai-rerank v2"
    template = MXBAI_RERANK_V2
