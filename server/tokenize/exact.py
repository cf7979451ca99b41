"""A cross-encoder's inputs exactly as FlagReranker.compute_score builds them, in batched tokenizer calls."""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.tokenize.flag_compat import detailed_instruct, prepare_for_model_compat
from server.tokenize.options import Options


@dataclass(frozen=True)
class Encoded:
    """One tokenized (query, passage) pair, exactly as FlagReranker builds it (lists, or numpy arrays from a worker)."""

    input_ids: Sequence[int]
    extra: dict[str, Sequence[int]]  # attention_mask, token_type_ids, ... as the tokenizer returns them

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Instructions:
    """FlagEmbedding's instruction settings of a reranker, without its weights (for a process that only tokenizes)."""

    query_instruction_for_rerank: str | None
    query_instruction_format: str
    passage_instruction_for_rerank: str | None
    passage_instruction_format: str
    query_max_length: int | None

    @classmethod
    def of(cls, flag: Any) -> Instructions:
        return cls(
            flag.query_instruction_for_rerank,
            flag.query_instruction_format,
            flag.passage_instruction_for_rerank,
            flag.passage_instruction_format,
            flag.query_max_length,
        )

    def get_detailed_inputs(self, pairs: Sequence[Sequence[str]]) -> list[list[str]]:
        """The pairs with their instructions, as AbsReranker.get_detailed_inputs builds them."""
        q_format, q_instruction = self.query_instruction_format, self.query_instruction_for_rerank
        p_format, p_instruction = self.passage_instruction_format, self.passage_instruction_for_rerank
        return [
            [detailed_instruct(q_format, q_instruction, q), detailed_instruct(p_format, p_instruction, p)]
            for q, p in pairs
        ]


class TokenizerCopies:
    """A tokenizer's copies, one per tokenizing thread.

    Each tokenizer call sets the Rust tokenizer's truncation on the object itself, so threads sharing one would
    truncate with each other's settings, or fail ("Already borrowed"); a copy per thread cannot. Copying a large
    tokenizer takes a while, so the copies are made at load (`make`), not on each thread's first request.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._local = threading.local()
        self._spare: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def make(self, count: int) -> None:
        for _ in range(count):
            self._spare.put(copy.deepcopy(self._tokenizer))

    def get(self) -> Any:
        """This thread's copy."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            try:
                tok = self._spare.get_nowait()
            except queue.Empty:
                tok = copy.deepcopy(self._tokenizer)
            self._local.tokenizer = tok
        return tok


class ThreadTokenizers:
    """The tokenizer, and its copies for the threads that tokenize with it; pickled without the copies."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._copies = TokenizerCopies(tokenizer)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_copies"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._copies = TokenizerCopies(self.tokenizer)

    def thread_tokenizer(self) -> Any:
        """This thread's own copy of the tokenizer (see TokenizerCopies)."""
        return self._copies.get()

    def copy_tokenizer(self, threads: int) -> None:
        """Make the copies of the tokenizer that `threads` tokenizing threads will use."""
        self._copies.make(threads)


# What transformers 5 runs between a tokenizer call and its Rust backend; a subclass overriding one may differ.
_RUST_STEPS = (
    "__call__",
    "_get_padding_truncation_strategies",
    "_encode_plus",
    "set_truncation_and_padding",
    "_convert_encoding",
    "_decode",
)


def calls_rust_directly(tokenizer: object) -> bool:
    """True when calling the tokenizer is exactly calling its Rust backend: transformers 5's TokenizersBackend, with
    none of the steps between the two (call, encode, convert, truncation set-up, decode) overridden."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    if not isinstance(tokenizer, TokenizersBackend) or hasattr(tokenizer, "_switch_to_input_mode"):
        return False
    return all(getattr(type(tokenizer), m) is getattr(TokenizersBackend, m) for m in _RUST_STEPS)


def _round_trip(rust: Any, texts: list[str], limit: int, side: str) -> list[tuple[str, Any]]:
    """Each text cut to `limit` tokens and decoded (special tokens kept), with the encoding of that decoded text."""
    rust.enable_truncation(limit, stride=0, strategy="longest_first", direction=side)
    first = rust.encode_batch(texts, add_special_tokens=False)
    decoded = rust.decode_batch([e.ids for e in first], skip_special_tokens=False)
    # A text that came back unchanged and was not cut would encode to what it already has; the others again.
    again = [
        i
        for i, (text, back, e) in enumerate(zip(texts, decoded, first, strict=True))
        if back != text or len(e) >= limit
    ]
    if again:
        rust.no_truncation()
        for i, e in zip(again, rust.encode_batch([decoded[i] for i in again], add_special_tokens=False), strict=True):
            first[i] = e
    return list(zip(decoded, first, strict=True))


def _cut_one(tokenize: Callable[[str], Any]) -> Encoded:
    """compute_score's `only_second` truncation, or cutting both texts where that raises."""
    try:
        item = tokenize("only_second")
    except Exception:
        # The decode/re-encode round trip can lengthen the query past max_length, where cutting the
        # passage alone is not enough (FlagReranker itself raises); cut both instead.
        item = tokenize("longest_first")
    return Encoded(list(item["input_ids"]), {k: list(v) for k, v in item.items() if k != "input_ids"})


class PairEncoder(ThreadTokenizers):
    """A cross-encoder's tokenizing, exactly as compute_score's; needs no weights, so it pickles to a worker."""

    def __init__(self, tokenizer: Any, instructions: Instructions, max_length: int) -> None:
        super().__init__(tokenizer, max_length)
        self.instructions = instructions
        self.rust = calls_rust_directly(tokenizer)
        # What transformers returns beside input_ids, and the Rust Encoding's name for it.
        names = tokenizer.model_input_names
        pieces = {"token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        self.extra_keys = {k: attr for k, attr in pieces.items() if k in names}

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Encoded]:
        """Tokenize pairs exactly as FlagReranker.compute_score does, in batched (GIL-free) tokenizer calls.

        compute_score truncates query (to 3/4 of max_length) and passage ids apart, and under transformers 5
        decodes both back to text and tokenizes the pair again (`prepare_for_model_compat`). Here each step is one
        batched call over all pairs, which gives the same ids as that per-pair path (tests/test_tokenize.py).
        """
        max_length, query_max = Options.of(options).limits(self.max_length, self.instructions.query_max_length)
        pairs = self.instructions.get_detailed_inputs([list(p) for p in pairs])
        tok = self.thread_tokenizer()
        if self.rust:
            return self._encode_rust(tok, pairs, query_max, max_length)
        # Another tokenizer: the same steps through its Python layer, the pairs joined one by one.
        unique = list(dict.fromkeys(p[0] for p in pairs))
        q_ids = tok(unique, add_special_tokens=False, max_length=query_max, truncation=True)["input_ids"]
        passages = [p[1] for p in pairs]
        d_ids = tok(passages, add_special_tokens=False, max_length=max_length, truncation=True)["input_ids"]
        if callable(getattr(tok, "prepare_for_model", None)):  # transformers 4: id-level joining, no round trip
            by_query = dict(zip(unique, q_ids, strict=True))
            return [self._join_one(tok, by_query[p[0]], d, max_length) for p, d in zip(pairs, d_ids, strict=True)]
        keep = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
        decoded = dict(zip(unique, tok.batch_decode(q_ids, **keep), strict=True))
        d_text = tok.batch_decode(d_ids, **keep)
        return [self._pair_one(tok, decoded[p[0]], d, max_length) for p, d in zip(pairs, d_text, strict=True)]

    def _encode_rust(self, tok: Any, pairs: list[list[str]], query_max: int, max_length: int) -> list[Encoded]:
        """encode's steps as the calls transformers makes on the (thread's own) Rust tokenizer, each one batched.

        Encoding a pair is encoding each text, then cutting the second to fit and adding the special tokens
        (`post_process`): so each distinct decoded text is encoded once, and a text that came back from its round
        trip unchanged and uncut keeps the encoding it already has.
        """
        rust = tok.backend_tokenizer
        side = tok.truncation_side
        rust.no_padding()
        if rust.encode_special_tokens != tok.split_special_tokens:
            rust.encode_special_tokens = tok.split_special_tokens
        unique = list(dict.fromkeys(q for q, _ in pairs))
        by_query = dict(zip(unique, _round_trip(rust, unique, query_max, side), strict=True))
        q = [by_query[query] for query, _ in pairs]  # (decoded text, its encoding) of each pair's query
        d = _round_trip(rust, [passage for _, passage in pairs], max_length, side)  # and of each passage
        out: list[Encoded | None] = [None] * len(pairs)
        # An empty text is no pair to the tokenizer's Python layer: compute_score's own call settles those.
        whole = [i for i in range(len(pairs)) if q[i][0] and d[i][0]]
        rust.enable_truncation(max_length, stride=0, strategy="only_second", direction=side)
        try:
            # Type ids: a post-processor without a pair template keeps each encoding's own, which only a pair encode
            # sets (1 for the second text); the usual templates set them anyway, but encoding the pair is sure.
            if "token_type_ids" in self.extra_keys:
                joined = rust.encode_batch([(q[i][0], d[i][0]) for i in whole])
            else:
                joined = [rust.post_process(q[i][1], d[i][1], add_special_tokens=True) for i in whole]
            for i, e in zip(whole, joined, strict=True):
                out[i] = Encoded(e.ids, {k: getattr(e, attr) for k, attr in self.extra_keys.items()})
        except Exception:  # some pair cannot be cut to fit by its passage alone: settle them one by one
            out = [None] * len(pairs)
        return [e if e is not None else self._pair_one(tok, q[i][0], d[i][0], max_length) for i, e in enumerate(out)]

    def _pair_one(self, tok: Any, query: str, passage: str, max_length: int) -> Encoded:
        """One decoded pair, as compute_score tokenizes it (see _cut_one)."""
        return _cut_one(lambda how: tok(query, passage, truncation=how, max_length=max_length, padding=False))

    def _join_one(self, tok: Any, q: list[int], d: list[int], max_length: int) -> Encoded:
        """One pair of ids joined at id level (transformers 4), as compute_score does (see _cut_one)."""
        return _cut_one(lambda how: prepare_for_model_compat(tok, q, d, truncation=how, max_length=max_length))
