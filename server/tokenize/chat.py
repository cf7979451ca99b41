"""A chat-template reranker's inputs (Qwen3-Reranker) exactly as its model card's reference code builds them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.tokenize.exact import ThreadTokenizers
from server.tokenize.options import Options
from server.tokenize.prompted import Prompted


@dataclass(frozen=True)
class ChatTemplate:
    """A family's fixed prompt: prefix and suffix tokenized apart, the middle formatted from each pair."""

    prefix: str
    middle: str  # str.format with instruction, query, document
    suffix: str
    default_instruction: str


QWEN3_RERANKER = ChatTemplate(
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    ),
    middle="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
)


class ChatEncoder(ThreadTokenizers):
    """Tokenizing of a chat-template reranker; needs no weights, so it pickles to a worker process.

    As the reference code: the middle is tokenized on its own and truncated (longest_first) to max_length less the
    prefix and suffix tokens, which are put around it."""

    def __init__(self, tokenizer: Any, max_length: int, template: ChatTemplate) -> None:
        super().__init__(tokenizer, max_length)
        self.template = template
        self.prefix = tokenizer.encode(template.prefix, add_special_tokens=False)
        self.suffix = tokenizer.encode(template.suffix, add_special_tokens=False)

    @property
    def overhead(self) -> int:
        """Tokens of every input that are not the pair's: prefix and suffix."""
        return len(self.prefix) + len(self.suffix)

    def texts(self, pairs: Sequence[tuple[str, str]], instruction: str = "") -> list[str]:
        """The middle part of each pair, formatted."""
        fmt, instruction = self.template.middle, instruction or self.template.default_instruction
        return [fmt.format(instruction=instruction, query=q, document=d) for q, d in pairs]

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Prompted]:
        o = Options.of(options)
        budget = (o.max_length or self.max_length) - self.overhead
        ids = self.thread_tokenizer()(
            self.texts(pairs, o.instruction),
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=budget,
        )["input_ids"]
        return [Prompted(self.prefix + list(x) + self.suffix) for x in ids]
