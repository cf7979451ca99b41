"""A chat-template reranker's inputs exactly as its reference code builds them: Qwen3-Reranker's model card,
mxbai-rerank v2's published package (`mxbai-rerank`, MxbaiRerankV2.prepare_inputs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.tokenize.exact import ThreadTokenizers
from server.tokenize.options import Options
from server.tokenize.prompted import Prompted


@dataclass(frozen=True)
class Parts:
    """A pair whose query and document are tokenized apart and joined as ids (mxbai-rerank v2): the query cut to 3/4
    of max_length, the document to the model's room, then `sep` + document cut to what the query leaves."""

    query: str  # str.format with query
    instructed: str  # ... with instruction and query, for a non-empty instruction
    document: str  # ... with document
    sep: str


@dataclass(frozen=True)
class ChatTemplate:
    """A family's fixed prompt: prefix and suffix tokenized apart, the middle formatted from each pair; the score is
    logit(answers[0]) - logit(answers[1]) at the last position."""

    prefix: str
    middle: str  # str.format with instruction, query, document; truncated whole (longest_first)
    suffix: str
    default_instruction: str
    answers: tuple[str, str] = ("yes", "no")
    tail: tuple[str, ...] = ()  # texts tokenized one by one, between the pair and the suffix
    parts: Parts | None = None  # the pair in parts instead of `middle` (max_length then excludes the template)


QWEN3_RERANKER = ChatTemplate(
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    ),
    middle="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
)

MXBAI_RERANK_V2 = ChatTemplate(  # mxbai-rerank 0.1.6, mxbai_rerank_v2.py: no instruction line unless one is given
    prefix=(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
    ),
    middle="",
    suffix="<|im_end|>\n<|im_start|>assistant\n",
    default_instruction="",
    answers=("1", "0"),
    tail=(
        "\n",
        "You are a search relevance expert who evaluates how well documents match search queries. For each "
        "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
        "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:",
    ),
    parts=Parts(
        query="query: {query}",
        instructed="instruction: {instruction}\nquery: {query}",
        document="document: {document}",
        sep="\n",
    ),
)


class ChatEncoder(ThreadTokenizers):
    """Tokenizing of a chat-template reranker; needs no weights, so it pickles to a worker process.

    As the reference code: the middle is tokenized on its own and truncated (longest_first) to max_length less the
    prefix and suffix tokens, which are put around it; or, for a template in parts, the query and the document are
    tokenized apart, max_length counts their tokens alone (capped so that the input fits `limit`, the model's
    positions) and the template's tokens come on top."""

    def __init__(self, tokenizer: Any, max_length: int, template: ChatTemplate, limit: int = 0) -> None:
        super().__init__(tokenizer, max_length)
        self.template = template
        self.limit = limit

        def ids(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        self.prefix = ids(template.prefix)
        self.suffix = [i for text in (*template.tail, template.suffix) for i in ids(text)]
        self.sep = ids(template.parts.sep) if template.parts else []

    @property
    def overhead(self) -> int:
        """Tokens of every input that are not the pair's: prefix and suffix."""
        return len(self.prefix) + len(self.suffix)

    def room(self, max_length: int) -> int:
        """Tokens for the pair itself under `max_length`."""
        if not self.template.parts:
            return max_length - self.overhead
        return min(max_length, self.limit - self.overhead) if self.limit else max_length

    def width(self, max_length: int) -> int:
        """The longest input under `max_length`, template included."""
        return self.room(max_length) + self.overhead

    def query_room(self, max_length: int) -> int:
        """Tokens the query part may take: the whole room where the middle is cut as one, else 3/4 of it."""
        room = self.room(max_length)
        return room * 3 // 4 if self.template.parts else room

    def halves(self, query: str, document: str, instruction: str = "") -> tuple[str, str]:
        """The pair's text as (what stands before the document, the document's text): what chunking measures."""
        parts = self.template.parts
        if parts is None:
            return self.texts([(query, "")], instruction)[0], document
        return self._query_text(query, instruction), parts.sep + parts.document.format(document=document)

    def _query_text(self, query: str, instruction: str) -> str:
        parts = self.template.parts
        assert parts is not None
        fmt = parts.instructed if instruction else parts.query
        return fmt.format(instruction=instruction, query=query)

    def texts(self, pairs: Sequence[tuple[str, str]], instruction: str = "") -> list[str]:
        """The middle part of each pair, formatted."""
        fmt, instruction = self.template.middle, instruction or self.template.default_instruction
        return [fmt.format(instruction=instruction, query=q, document=d) for q, d in pairs]

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Prompted]:
        o = Options.of(options)
        if self.template.parts:
            return self._encode_parts(pairs, o)
        budget = self.room(o.max_length or self.max_length)
        ids = self.thread_tokenizer()(
            self.texts(pairs, o.instruction),
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=budget,
        )["input_ids"]
        return [Prompted(self.prefix + list(x) + self.suffix) for x in ids]

    def _encode_parts(self, pairs: Sequence[tuple[str, str]], o: Options) -> list[Prompted]:
        """MxbaiRerankV2.prepare_inputs: the query cut to 3/4 of the room; the document to the room (and to the
        positions the query leaves); `sep` + document then cut to the room the query leaves (prepare_for_model's
        only_second), on the tokenizer's truncation side. Cutting ids is what truncating in the tokenizer does."""
        parts = self.template.parts
        assert parts is not None
        max_length = o.max_length or self.max_length
        room = self.room(max_length)
        tok = self.thread_tokenizer()
        kwargs = {"add_special_tokens": False, "truncation": True, "padding": False, "return_attention_mask": False}
        queries = tok(
            [self._query_text(q, o.instruction) for q, _ in pairs], max_length=self.query_room(max_length), **kwargs
        )
        documents = tok([parts.document.format(document=d) for _, d in pairs], max_length=room, **kwargs)
        left = tok.truncation_side == "left"
        out = []
        for q, d in zip(queries["input_ids"], documents["input_ids"], strict=True):
            if self.limit:
                d = _cut(d, self.limit - len(q) - self.overhead, left)
            second = _cut(self.sep + list(d), room - len(q), left)
            out.append(Prompted(self.prefix + list(q) + second + self.suffix))
        return out


def _cut(ids: Sequence[int], length: int, left: bool) -> list[int]:
    """`ids` cut to `length`, keeping the end when the tokenizer truncates on the left."""
    if len(ids) <= length:
        return list(ids)
    return list(ids[len(ids) - max(length, 0) :] if left else ids[: max(length, 0)])
