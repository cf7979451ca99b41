"""Decoder-only rerankers: scores equal FlagEmbedding's own compute_score, batches mix requests, detection."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.config import load_config
from server.engine.llm_model import LLMRerankerModel, layerwise_compat, load_flag_reranker, model_kind
from server.engine.model import ModelLoadError, RerankerModel
from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import SENTENCES, build_layerwise_model, build_llm_model

ARCHS = ("gemma", "qwen2", "layerwise")  # bos + left padding, no bos + right padding, the layer-wise MiniCPM

ODD = ["", "😀 e\u0301 ﬁ", "\n\n", "什么是函数计算", "<bos> Yes No <pad>", "a " * 60]
PAIRS = [(q, p) for q in SENTENCES for p in SENTENCES] + [(q, p) for q in ODD for p in ODD[::-1]]


@dataclass(frozen=True)
class Loaded:
    path: Path
    kind: str
    engine: LLMRerankerModel
    reference: Any  # FlagLLMReranker or LayerWiseFlagLLMReranker on the same weights


def _build(arch: str, directory: Path) -> Path:
    return build_layerwise_model(directory) if arch == "layerwise" else build_llm_model(directory, 0, arch)


@pytest.fixture(scope="module", params=ARCHS)
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = _build(request.param, tmp_path_factory.mktemp(f"bge-reranker-tiny-{request.param}"))
    kind = model_kind(str(path))
    engine = LLMRerankerModel(test_config(path), str(path), kind)
    reference = load_flag_reranker(str(path), kind, devices=["cpu"], use_fp16=False)
    return Loaded(path, kind, engine, reference)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = build_llm_model(tmp_path_factory.mktemp("bge-reranker-tiny-gemma-e2e"), 1, "gemma")
    engine = LLMRerankerModel(test_config(path), str(path), "llm")
    return Loaded(path, "llm", engine, load_flag_reranker(str(path), "llm", devices=["cpu"], use_fp16=False))


@pytest.fixture(scope="module")
def layerwise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_layerwise_model(tmp_path_factory.mktemp("tiny-layerwise"), 2)


def test_scores_equal_compute_score(llm: Loaded) -> None:
    ours = llm.engine.score(PAIRS)
    assert ours == pytest.approx(llm.reference.compute_score([list(p) for p in PAIRS]), **FP32_REORDERED)
    assert len({round(s, 4) for s in ours[: len(SENTENCES) ** 2]}) > len(SENTENCES)  # the pairs are told apart


@pytest.mark.parametrize("max_length", [24, 96])
def test_request_max_length_truncates_like_compute_score(llm: Loaded, max_length: int) -> None:
    long = ("a " * 150, "b " * 150)
    pairs = [*PAIRS[:: len(SENTENCES) + 1], long]
    ours = llm.engine.forward(llm.engine.encode(pairs, max_length))
    expected = llm.reference.compute_score([list(p) for p in pairs], max_length=max_length)
    assert ours == pytest.approx(expected, **FP32_REORDERED)
    prompt = len(llm.engine.encoder.sep) + len(llm.engine.encoder.prompt)  # 64 tokens with the tiny tokenizer
    if max_length * 3 // 4 > prompt:  # the query's share alone passes the prompt: the passage is cut
        assert len(llm.engine.encode([long], max_length)[0]) == max_length + 2 * prompt


def test_batches_mixing_requests_score_as_each_pair_alone(llm: Loaded) -> None:
    requests = [[(SENTENCES[i], p) for p in SENTENCES[j::3]] for i, j in ((0, 0), (2, 1), (7, 2))]
    items = [(r, k, e) for r, pairs in enumerate(requests) for k, e in enumerate(llm.engine.encode(pairs))]
    alone = {(r, k): llm.engine.forward([e])[0] for r, k, e in items}
    for seed in range(3):  # different batch-mates, widths and padding each time
        random.Random(seed).shuffle(items)
        for start in range(0, len(items), 5):
            batch = items[start : start + 5]
            scores = llm.engine.launch([e for _, _, e in batch])()
            assert scores == pytest.approx([alone[r, k] for r, k, _ in batch], **FP32_REORDERED)


def test_concurrent_encodes_give_each_its_own_truncation(llm: Loaded) -> None:
    # The tokenize pool encodes requests in parallel; a call sets truncation on the tokenizer it uses.
    jobs = [(PAIRS[i::5], max_length) for i in range(5) for max_length in (16, 40, None)]
    expected = [[e.input_ids for e in llm.engine.encode(p, m)] for p, m in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda k: [e.input_ids for e in llm.engine.encode(*jobs[k % len(jobs)])], range(150)))
    assert all(g == expected[k % len(jobs)] for k, g in enumerate(got))


def test_cutoff_layer_scores_equal_compute_score(layerwise_dir: Path) -> None:
    engine = LLMRerankerModel(test_config(layerwise_dir, cutoff_layer=3), str(layerwise_dir), "layerwise")
    last = LLMRerankerModel(test_config(layerwise_dir), str(layerwise_dir), "layerwise")
    reference = load_flag_reranker(str(layerwise_dir), "layerwise", devices=["cpu"], use_fp16=False)
    pairs = PAIRS[:: len(SENTENCES) - 1]
    ours = engine.score(pairs)
    assert ours == pytest.approx(reference.compute_score([list(p) for p in pairs], cutoff_layers=[3]), **FP32_REORDERED)
    assert ours != pytest.approx(last.score(pairs), abs=1e-3)  # another layer's head: other scores


@pytest.mark.parametrize("layer", [1, 5])
def test_cutoff_layer_without_a_head_is_refused(layerwise_dir: Path, layer: int) -> None:
    with pytest.raises(ModelLoadError, match=rf"--cutoff-layer {layer} is outside .* scoring layers 2\.\.4"):
        LLMRerankerModel(test_config(layerwise_dir, cutoff_layer=layer), str(layerwise_dir), "layerwise")


def test_layerwise_rotary_tables_are_the_ones_its_init_computes(layerwise_dir: Path) -> None:
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        LayerWiseMiniCPMForCausalLM,
    )

    loaded = load_flag_reranker(str(layerwise_dir), "layerwise", devices=["cpu"]).model
    with layerwise_compat():
        built = LayerWiseMiniCPMForCausalLM(loaded.config)  # __init__ fills the tables; loading does not
    rotary = [m for m in loaded.modules() if hasattr(m, "cos_cached")]
    assert len(rotary) == 4
    for ours, theirs in zip(rotary, [m for m in built.modules() if hasattr(m, "cos_cached")], strict=True):
        for name in ("inv_freq", "cos_cached", "sin_cached"):
            assert getattr(ours, name).equal(getattr(theirs, name)), name


def test_model_kind_reads_config_json(llm: Loaded, model_dir: Path) -> None:
    assert model_kind(str(model_dir)) == "cross-encoder"
    assert llm.kind == ("layerwise" if "layerwise" in llm.path.name else "llm")


def test_model_type_overrides_detection(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SomethingNew"]}))
    assert model_kind(str(tmp_path), "llm") == "llm"
    assert model_kind(str(model_dir), "layerwise") == "layerwise"
    with pytest.raises(ModelLoadError, match="--model-type must be one of"):
        model_kind(str(model_dir), "seq2seq")


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["BertModel"], "model_type": "bert"},
        {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "no", "1": "yes"}},
        {"model_type": "llama"},
    ],
)
def test_config_that_is_no_reranker_is_refused_clearly(tmp_path: Path, config: dict[str, Any]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is not a reranker this server can serve") as caught:
        model_kind(str(tmp_path))
    assert "--model-type overrides the detection" in str(caught.value)


def test_cross_encoder_engine_points_a_decoder_only_model_to_model_type(layerwise_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a decoder-only model.*--model-type auto or the --model-type of its"):
        RerankerModel(test_config(layerwise_dir))


def test_model_type_and_cutoff_layer_flags() -> None:
    config = load_config(["--model-type", "layerwise", "--cutoff-layer", "28"], env={})
    assert (config.model_type, config.cutoff_layer) == ("layerwise", 28)
    config = load_config([], env={"RERANKER_MODEL_TYPE": "llm", "RERANKER_CUTOFF_LAYER": "3"})
    assert (config.model_type, config.cutoff_layer) == ("llm", 3)
    default = load_config([], env={})
    assert (default.model_type, default.cutoff_layer) == ("auto", 0)
    bad = [(["--cutoff-layer", "-1"], {}), (["--model-type", "gpt"], {}), ([], {"RERANKER_MODEL_TYPE": "x"})]
    for argv, env in bad:
        with pytest.raises(SystemExit):
            load_config(argv, env=env)


@pytest.fixture
async def llm_stub(gemma: Loaded) -> AsyncIterator[pb_grpc.RerankerStub]:
    srv = RerankServer(test_config(gemma.path), engine=gemma.engine)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            yield pb_grpc.RerankerStub(channel)
    finally:
        await srv.stop(0)


@pytest.mark.parametrize("normalize", [False, True])
async def test_server_scores_equal_flag_llm_reranker(
    llm_stub: pb_grpc.RerankerStub, gemma: Loaded, normalize: bool
) -> None:
    candidates = SENTENCES
    calls = [llm_stub.Rerank(pb.RerankRequest(query=q, candidates=candidates, normalize=normalize)) for q in SENTENCES]
    responses = await asyncio.gather(*calls)  # concurrent requests: the batcher mixes their pairs
    for q, resp in zip(SENTENCES, responses, strict=True):
        expected = gemma.reference.compute_score([[q, c] for c in candidates], normalize=normalize)
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
    assert responses[0].results[0].index == max(range(len(candidates)), key=lambda i: responses[0].scores[i])


async def test_a_cross_encoder_and_an_llm_reranker_in_one_server(gemma: Loaded, model_dir: Path) -> None:
    """Loaded by the server itself (detection from config.json), side by side, each scoring as its own class."""
    from FlagEmbedding import FlagReranker

    srv = RerankServer(test_config(model_dir, model=f"ce={model_dir},llm={gemma.path}"))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            pairs = [list(p) for p in PAIRS[:4]]
            for name, reference in [("llm", gemma.reference), ("ce", FlagReranker(str(model_dir), devices=["cpu"]))]:
                resp = await stub.Rerank(
                    pb.RerankRequest(pairs=[pb.Pair(query=q, passage=p) for q, p in pairs], model=name)
                )
                assert list(resp.scores) == pytest.approx(reference.compute_score(pairs), **FP32_REORDERED)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="llm"))
            assert list(info.models) == ["ce", "llm"] and info.revision
    finally:
        await srv.stop(0)
