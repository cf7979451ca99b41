"""Modern cross-encoders out of the box: BERT (ms-marco MiniLM), ModernBERT (gte-reranker-modernbert-base) and
DeBERTa-v2 (mxbai-rerank v1), served exactly as FlagReranker.compute_score and sentence-transformers' CrossEncoder
score them, alone and batched with other requests, through a real server and channel."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from FlagEmbedding import FlagReranker
from sentence_transformers import CrossEncoder

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.engine.load import load_engine
from tests.conftest import FP32_REORDERED, started, test_config
from tools.make_model import SENTENCES, build_bert_model, build_deberta_model, build_modernbert_model

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "bert": build_bert_model,
    "modernbert": build_modernbert_model,
    "deberta-v2": build_deberta_model,
}
# CrossEncoder.predict's default activation on each: ms-marco's config.json asks for Identity (raw logits); a config
# without one gets the sigmoid for one label, which is the server's `normalize`.
CE_DEFAULT_IS_SIGMOID = {"bert": False, "modernbert": True, "deberta-v2": True}
# Texts every test tokenizer decodes and re-encodes to the same ids, and that fit max_length: FlagReranker (so the
# server) and CrossEncoder tokenize them alike. "，" is unknown to the tiny DeBERTa's SentencePiece model: see below.
TEXTS = [s for s in SENTENCES if "，" not in s]
LONG = " ".join(SENTENCES) * 12  # over 512 tokens in every test tokenizer: cut to fit
# fp32 on CPU: other batch-mates, widths or thread counts (the server's torch threads, CrossEncoder's own length-sorted
# batches) move the tiny models' scores by float rounding only: up to 2e-6 seen.
TOL = 1e-5

module_loop = pytest.mark.asyncio(loop_scope="module")  # one server (three models, three workers) for the module


@dataclass(frozen=True)
class Family:
    kind: str
    path: Path
    flag: FlagReranker
    ce: CrossEncoder


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    out = {}
    for kind, build in BUILDERS.items():
        path = build(tmp_path_factory.mktemp(f"tiny-{kind}"))
        flag = FlagReranker(str(path), devices=["cpu"], use_fp16=False)
        out[kind] = Family(kind, path, flag, CrossEncoder(str(path), device="cpu", max_length=512))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(families: dict[str, Family]) -> AsyncIterator[pb_grpc.RerankerStub]:
    """One server with the three models, each loaded by the server itself (`--model-type auto`: detection), its
    pairs tokenized in a worker process, and a batch window wide enough for concurrent requests to share passes."""
    spec = ",".join(f"{kind}={f.path}" for kind, f in families.items())
    srv = RerankServer(test_config(families["bert"].path, model=spec, tokenize_workers=1, max_wait_ms=50.0))
    async with started(srv) as stub:
        yield stub


def raw_ce(family: Family, pairs: list[tuple[str, str]]) -> list[float]:
    return [float(s) for s in family.ce.predict(pairs, activation_fn=torch.nn.Identity())]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@module_loop
@pytest.mark.parametrize("kind", list(BUILDERS))
async def test_alone_equals_flag_reranker_and_cross_encoder(
    stub: pb_grpc.RerankerStub, families: dict[str, Family], kind: str
) -> None:
    family = families[kind]
    for query in ["what is panda?", TEXTS[5]]:
        pairs = [(query, t) for t in TEXTS]
        raw = await stub.Rerank(pb.RerankRequest(query=query, candidates=TEXTS, model=kind))
        normalized = await stub.Rerank(pb.RerankRequest(query=query, candidates=TEXTS, model=kind, normalize=True))
        expected = family.flag.compute_score([list(p) for p in pairs])
        assert list(raw.scores) == pytest.approx(expected, abs=TOL)
        assert list(raw.scores) == pytest.approx(raw_ce(family, pairs), abs=TOL)
        assert list(normalized.scores) == pytest.approx([sigmoid(s) for s in expected], abs=TOL)
        # CrossEncoder.predict as a user calls it: sigmoid unless the model's config asks for raw logits (ms-marco).
        default = [float(s) for s in family.ce.predict(pairs)]
        ours = normalized.scores if CE_DEFAULT_IS_SIGMOID[kind] else raw.scores
        assert list(ours) == pytest.approx(default, abs=TOL)
        assert len({round(s, 4) for s in raw.scores}) >= len(TEXTS) - 1  # distinct: a misplaced score would show
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(model=kind))
    assert info.model == kind and info.max_length == 512


@module_loop
async def test_requests_batched_together_equal_each_alone(
    stub: pb_grpc.RerankerStub, families: dict[str, Family]
) -> None:
    """Concurrent requests to the three models, with passages over max_length and their own max_length: each model's
    batcher puts several requests in one forward pass, and every score equals compute_score's for its request."""
    requests = []
    for i, kind in enumerate(families):
        for j in range(4):
            candidates = TEXTS[j : j + 3 + i] + ([LONG[j * 40 :]] if j % 2 else [])
            requests.append((kind, pb.RerankRequest(query=TEXTS[(i + j) % len(TEXTS)], candidates=candidates,
                                                    model=kind, max_length=[0, 64, 512, 48][j])))  # fmt: skip
    server: RerankServer = stub.server  # type: ignore[attr-defined]
    before = {kind: server.batcher(kind).stats.batches for kind in families}  # type: ignore[union-attr]
    responses = await asyncio.gather(*(stub.Rerank(r) for _, r in requests))
    for (kind, req), resp in zip(requests, responses, strict=True):
        pairs = [[req.query, c] for c in req.candidates]
        expected = families[kind].flag.compute_score(pairs, max_length=req.max_length or 512)
        assert list(resp.scores) == pytest.approx(expected, abs=TOL), (kind, req.max_length)
        if req.max_length in (0, 512):  # within CrossEncoder's own limit it truncates as compute_score does
            assert list(resp.scores) == pytest.approx(raw_ce(families[kind], [tuple(p) for p in pairs]), abs=TOL)
    for kind in families:
        batches = server.batcher(kind).stats.batches - before[kind]  # type: ignore[union-attr]
        assert batches < 4, f"{kind}: 4 concurrent requests took {batches} forward passes"


def test_a_text_the_tokenizer_cannot_round_trip_is_scored_as_flag_reranker_does(families: dict[str, Family]) -> None:
    """The one place the two oracles part: FlagReranker (under transformers 5) decodes each text and tokenizes the
    pair again, so a character the tokenizer does not know comes back as the text "[UNK]" (here DeBERTa's "，");
    CrossEncoder tokenizes the pair once. The server follows FlagReranker, as it does for every cross-encoder."""
    from server.engine.model import RerankerModel

    family = families["deberta-v2"]
    engine = RerankerModel(test_config(family.path))
    pair = ("what is panda?", next(s for s in SENTENCES if "，" in s))
    ours = engine.score([pair])
    assert ours == pytest.approx(family.flag.compute_score([list(pair)]), **FP32_REORDERED)
    assert abs(ours[0] - raw_ce(family, [pair])[0]) > 1e-3


def test_each_family_is_detected_as_a_cross_encoder_and_takes_the_fast_tokenizer_path(
    families: dict[str, Family],
) -> None:
    for kind, family in families.items():
        engine = load_engine(test_config(family.path), str(family.path), kind)
        assert type(engine).__name__ == "RerankerModel"
        assert engine.encoder.rust, f"{kind}: the tokenizer's Python layer, not its Rust calls"
        type_ids = "token_type_ids" in engine.encoder.extra_keys
        assert type_ids == (kind != "modernbert"), kind  # ModernBERT's tokenizer gives none, and its model takes none
