"""The batched tokenizer path gives exactly compute_score's ids, and padding exactly tokenizer.pad's tensors."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from FlagEmbedding.inference.reranker.encoder_only import base as flag_base
from FlagEmbedding.utils.tokenizer_compat import pad_with_compat
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import SENTENCES, build_bert_model, build_deberta_model, build_modernbert_model

# Pieces that stress the decode/re-encode round trip: words the test tokenizer knows, CJK, emoji, combining
# marks, runs of spaces, characters it has never seen (unknown tokens), and zero-width or control-like ones.
PIECES = [
    *" ".join(SENTENCES).split(),
    *"什么是函数计算今天天气",
    "😀",
    "👩‍💻",
    "e\u0301",
    "\u0308",
    "Ж",
    "ß",
    "ﬁ",
    "\u200b",
    " ",
    "   ",
    "\t",
    "\n",
    "<unk>",
    "<s>",
    "€",
    "١٢٣",
]
MAX_LENGTHS = [8, 12, 16, 32, 64, 512]


def texts(max_pieces: int, pieces: list[str] = PIECES) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), min_size=1, max_size=max_pieces).map("".join)


@contextmanager
def recorded_compute_score_ids() -> Iterator[list[tuple[dict[str, list[int]], bool]]]:
    """Each pair's inputs as compute_score builds them, and whether its own path raised for that pair.

    Where FlagReranker's `only_second` raises (the round trip made the query too long) the server cuts both texts
    instead; the recorder does the same so compute_score can go on, and marks the pair.
    """
    original = flag_base.prepare_for_model_compat
    seen: list[tuple[dict[str, list[int]], bool]] = []

    def record(tokenizer: Any, q: Any, d: Any, **kwargs: Any) -> Any:
        try:
            item = original(tokenizer, q, d, **kwargs)
            raised = False
        except Exception:
            item = original(tokenizer, q, d, **{**kwargs, "truncation": "longest_first"})
            raised = True
        seen.append(({k: list(v) for k, v in item.items()}, raised))
        return item

    flag_base.prepare_for_model_compat = record
    try:
        yield seen
    finally:
        flag_base.prepare_for_model_compat = original


def _check_same_ids(engine: Any, flag_reranker: Any, pairs: list[tuple[str, str]], max_length: int) -> int:
    with recorded_compute_score_ids() as seen:
        flag_reranker.compute_score([list(p) for p in pairs], max_length=max_length)
    ours = engine.encode(pairs, max_length)
    as_lists = [{k: np.asarray(v).tolist() for k, v in {"input_ids": e.input_ids, **e.extra}.items()} for e in ours]
    assert as_lists == [inputs for inputs, _ in seen]
    for e in ours:
        assert len(e) <= max_length
        assert all(len(v) == len(e) for v in e.extra.values())
    return sum(raised for _, raised in seen)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: Any) -> Any:
    from server.engine.model import RerankerModel

    model = RerankerModel(test_config(build_bert_model(tmp_path_factory.mktemp("bert"))))
    assert model.encoder.rust and "token_type_ids" in model.encoder.extra_keys
    return model


class _ThroughWorker:
    """encode through a tokenizer worker process: the pickled encoder, the socket, the packed arrays."""

    def __init__(self, encoder: Any) -> None:
        from server.tokenize.workers import TokenizerWorkers

        self.workers = TokenizerWorkers(encoder, 1)
        self.workers.start()
        self.encode = self.workers.encode


@pytest.fixture(
    scope="module",
    params=["rust", "rust, BERT with token type ids", "python layer", "worker process", "worker process, BERT"],
)
def paths(request: pytest.FixtureRequest, engine: Any, flag_reranker: Any, bert: Any) -> Iterator[Any]:
    """(engine, FlagReranker) for each way encode can go: the Rust calls joining encodings (`post_process`), the Rust
    calls encoding pairs (a BERT tokenizer: token type ids 0 and 1, lower-casing), the tokenizer's Python layer, and
    the Rust paths in a worker process (what the server runs with --tokenize-workers)."""
    from server.engine.model import TokenizerCopies

    if request.param == "rust":
        yield engine, flag_reranker
    elif request.param == "python layer":
        other = copy.copy(engine.encoder)
        other.rust, other._copies = False, TokenizerCopies(engine.tokenizer)
        yield other, flag_reranker
    elif request.param.startswith("worker process"):
        model = bert if "BERT" in request.param else engine
        worker = _ThroughWorker(model.encoder)
        yield worker, model.flag
        worker.workers.close()
    else:
        yield bert, bert.flag


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    max_length=st.sampled_from(MAX_LENGTHS),
    queries=st.lists(texts(60), min_size=1, max_size=3),
)
def test_batched_ids_equal_compute_score(paths: Any, data: st.DataObject, max_length: int, queries: list[str]) -> None:
    passages = data.draw(st.lists(texts(400), min_size=1, max_size=8))
    pairs = [(queries[i % len(queries)], p) for i, p in enumerate(passages)]
    raised = _check_same_ids(*paths, pairs, max_length)
    event("some pair raised in FlagReranker's own path" if raised else "no pair raised")


@pytest.fixture(scope="module", params=["DeBERTa-v2 (SentencePiece unigram)", "ModernBERT (byte-level BPE)"])
def modern(request: pytest.FixtureRequest, tmp_path_factory: Any) -> tuple[Any, Any]:
    """(engine, FlagReranker) of the newer cross-encoders' tokenizers, on the Rust calls."""
    from server.engine.model import RerankerModel

    build = build_deberta_model if request.param.startswith("DeBERTa") else build_modernbert_model
    model = RerankerModel(test_config(build(tmp_path_factory.mktemp("modern"))))
    assert model.encoder.rust
    return model, model.flag


# Their own special tokens written as text, and a character the tiny SentencePiece model does not know.
MODERN_PIECES = [*PIECES, "[UNK]", "[SEP]", "[CLS]", "，"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    max_length=st.sampled_from(MAX_LENGTHS),
    queries=st.lists(texts(60, MODERN_PIECES), min_size=1, max_size=3),
)
def test_batched_ids_equal_compute_score_for_newer_tokenizers(
    modern: tuple[Any, Any], data: st.DataObject, max_length: int, queries: list[str]
) -> None:
    passages = data.draw(st.lists(texts(400, MODERN_PIECES), min_size=1, max_size=8))
    pairs = [(queries[i % len(queries)], p) for i, p in enumerate(passages)]
    _check_same_ids(*modern, pairs, max_length)


def test_pairs_where_flagreranker_raises_are_cut_on_both_sides(paths: Any, flag_reranker: Any) -> None:
    # Queries at 3/4 of max_length that the round trip lengthens (with the test tokenizer: unknown characters, which
    # decode to '<unk>', and CJK), next to ordinary pairs in one call: the batched call fails, each pair is exact.
    pairs = [
        ("what is panda?", SENTENCES[2]),
        ("abcdefghijklmnop" * 3, SENTENCES[2]),
        ("hi", "今天天气怎么样 " * 30),
        ("什么 是 " * 10, "hi"),
    ]
    raised = _check_same_ids(*paths, pairs, 16)
    if paths[1] is flag_reranker:  # the pairs are made to raise with the test tokenizer (BERT's keeps '[UNK]' short)
        assert raised >= 1


def test_round_trip_matters(engine: Any) -> None:
    """The test tokenizer is one where decoding and re-encoding changes ids, so the parity tests mean something."""
    tok = engine.tokenizer
    changed = 0
    for text in SENTENCES + ["Ж ß € e\u0301 👩‍💻  x"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        again = tok(
            tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), add_special_tokens=False
        )
        changed += again["input_ids"] != ids
    assert changed >= 1


@pytest.mark.parametrize("lengths", [[5], [3, 9, 1], [40, 2, 2, 17]])
def test_collate_equals_tokenizer_pad(engine: Any, lengths: list[int]) -> None:
    pairs = [("what is panda?", " ".join(SENTENCES)[: 7 * n]) for n in lengths]
    batch = engine.encode(pairs, 32)
    ours = engine._collate(batch)
    theirs = pad_with_compat(
        engine.tokenizer, [{"input_ids": e.input_ids, **e.extra} for e in batch], padding=True, return_tensors="pt"
    )
    assert sorted(ours) == sorted(theirs.keys())
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key


def test_launch_then_collect_equals_compute_score(engine: Any, flag_reranker: Any) -> None:
    pairs = [("what is panda?", s) for s in SENTENCES]
    collect = engine.launch(engine.encode(pairs))
    expected = flag_reranker.compute_score([list(p) for p in pairs])
    assert collect() == pytest.approx(expected, **FP32_REORDERED)


def test_threads_tokenizing_at_once_get_the_ids_of_one_thread(engine: Any) -> None:
    """Each call sets truncation on the tokenizer object; threads must not see each other's settings."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        ([(f"q{i} " + SENTENCES[i % 11], SENTENCES[(i * 3) % 11] * 9)] * 5, [16, 48, 512][i % 3]) for i in range(60)
    ]
    serial = [[e.input_ids for e in engine.encode(pairs, n)] for pairs, n in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: [e.input_ids for e in engine.encode(*job)], jobs))
    assert parallel == serial


def test_tokenizer_copies_made_at_load_go_one_to_each_thread(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from server.tokenize import exact

    made: list[Any] = []
    monkeypatch.setattr(exact.copy, "deepcopy", lambda tok: made.append(copy.copy(tok)) or made[-1])
    copies = exact.TokenizerCopies(engine.tokenizer)
    copies.make(2)
    assert len(made) == 2
    start = threading.Barrier(3)

    def take(_: int) -> tuple[Any, Any]:
        start.wait(10)  # three threads at once, so each asks for a copy of its own
        return copies.get(), copies.get()

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(take, range(3)))
    assert all(first is again for first, again in got)  # a thread keeps its copy
    assert len(made) == 3  # the third thread copied its own; the other two took the ones made at load
    assert {id(first) for first, _ in got} == {id(t) for t in made}
