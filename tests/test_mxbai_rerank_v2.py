"""mxbai-rerank v2 (mixedbread-ai/mxbai-rerank-base-v2, -large-v2: Qwen2 "1"/"0" rerankers) served exactly as the
published `mxbai-rerank` package (0.1.6, a test dependency) scores it, through a real server and channel: alone and
batched with other requests, with an instruction, long texts cut or chunked, normalize; and detection, by name only."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import math
import shutil
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.engine.llm_model import model_kind
from server.engine.load import load_engine
from server.engine.model import ModelLoadError
from server.tokenize.options import Options
from tests.conftest import FP32_REORDERED, started, test_config
from tools.make_model import SENTENCES, build_mxbai_v2_model

module_loop = pytest.mark.asyncio(loop_scope="module")  # the tests share one server, on one event loop

MODEL_TYPE = "mxbai-rerank-v2"  # the family's --model-type value
FAMILY = "mxbai-rerank-v2"  # and its GetModelInfo.family
LONG = " ".join(SENTENCES) * 12  # past max_length: cut as the package cuts it
INSTRUCTION = "Find passages about animals"


def restore_prepare_for_model(tokenizer: Any) -> None:
    """mxbai-rerank 0.1.6 joins the query and document ids with `tokenizer.prepare_for_model`, which transformers 5
    removed. FlagEmbedding's published compat restores transformers 4's result for the package's arguments (no special
    tokens, `only_second` truncation on the tokenizer's truncation side): the package's padded input ids came out
    identical under transformers 4.57.1 and under 5.23 with this (max_length 512, 64 and 24, with and without an
    instruction, long queries and documents). It calls a copy, so that it does not find itself."""
    from FlagEmbedding.utils.tokenizer_compat import prepare_for_model_compat

    plain = copy.copy(tokenizer)
    object.__setattr__(tokenizer, "prepare_for_model", functools.partial(prepare_for_model_compat, plain))


def package(model_dir: Path, max_length: int = 512) -> Any:
    """The package's own reranker on the same weights; max_length as the server's (the package's default is 8192)."""
    from mxbai_rerank import MxbaiRerankV2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch_dtype's deprecation, in the package's call
        reranker = MxbaiRerankV2(str(model_dir), device="cpu", torch_dtype=torch.float32, max_length=max_length)
    restore_prepare_for_model(reranker.tokenizer)
    return reranker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Named as the hub's models are: `--model-type auto` recognises the family by that name alone."""
    return build_mxbai_v2_model(tmp_path_factory.mktemp("models") / "mxbai-rerank-base-v2-tiny")


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Any:
    return package(model_dir)


def expected(oracle: Any, query: str, documents: list[str], instruction: str | None = None) -> list[float]:
    """The package's raw scores, logit("1") - logit("0") at the last position, each pair in a call of its own."""
    return [float(oracle.predict([query], [d], instruction=instruction)[0]) for d in documents]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(model_dir: Path) -> AsyncIterator[pb_grpc.RerankerStub]:
    srv = RerankServer(test_config(model_dir, max_wait_ms=50.0))  # --model-type auto: detected by its name
    async with started(srv) as stub:
        yield stub


@module_loop
async def test_alone_equals_the_package(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    for query in ["what is panda?", SENTENCES[5]]:
        resp = await stub.Rerank(pb.RerankRequest(query=query, candidates=SENTENCES))
        assert list(resp.scores) == pytest.approx(expected(oracle, query, SENTENCES), **FP32_REORDERED)
        assert len({round(s, 4) for s in resp.scores}) >= len(SENTENCES) - 1


@module_loop
async def test_the_instruction_is_the_packages_instruction_line(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    query = "what is panda?"
    resp = await stub.Rerank(pb.RerankRequest(query=query, candidates=SENTENCES, instruction=INSTRUCTION))
    with_line = expected(oracle, query, SENTENCES, INSTRUCTION)
    assert list(resp.scores) == pytest.approx(with_line, **FP32_REORDERED)
    assert with_line != pytest.approx(expected(oracle, query, SENTENCES), abs=1e-3)  # the line changes the scores
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.family == FAMILY and info.default_instruction == ""  # the package adds no line by default


@module_loop
async def test_long_texts_are_cut_as_the_package_cuts_them(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    documents = [LONG, LONG[100:], "hi"]
    for query in ["what is panda?", LONG[:3000]]:  # a query past 3/4 of max_length too
        resp = await stub.Rerank(pb.RerankRequest(query=query, candidates=documents))
        assert list(resp.scores) == pytest.approx(expected(oracle, query, documents), **FP32_REORDERED)


@module_loop
async def test_requests_batched_together_equal_each_alone(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    requests = [
        pb.RerankRequest(
            query=SENTENCES[i], candidates=SENTENCES[i : i + 4] + [LONG[i * 50 :]], instruction=[INSTRUCTION, ""][i % 2]
        )
        for i in range(6)
    ]
    batcher = stub.server.batcher()  # type: ignore[attr-defined]
    before = batcher.stats.batches
    responses = await asyncio.gather(*(stub.Rerank(r) for r in requests))
    for req, resp in zip(requests, responses, strict=True):
        want = expected(oracle, req.query, list(req.candidates), req.instruction or None)
        assert list(resp.scores) == pytest.approx(want, **FP32_REORDERED)  # batched with the other requests
    batches = batcher.stats.batches - before
    assert batches < len(requests), f"{len(requests)} concurrent requests took {batches} forward passes"


@module_loop
async def test_normalize_is_the_sigmoid_of_the_raw_score_not_the_packages_shifted_one(
    stub: pb_grpc.RerankerStub, oracle: Any
) -> None:
    """`normalize` here is sigmoid(raw) = P("1") against "0", as for every family. The package's own `normalize=True`
    is sigmoid(raw - estimated_max / 2), estimated_max 9 for mxbai-rerank-base-v2, 12 for large-v2 and for any other
    name or a local directory: same order, other numbers. The README's families table says which dialect returns which.
    """
    query = "what is panda?"
    raw = await stub.Rerank(pb.RerankRequest(query=query, candidates=SENTENCES))
    normalized = await stub.Rerank(pb.RerankRequest(query=query, candidates=SENTENCES, normalize=True))
    assert list(normalized.scores) == pytest.approx([1 / (1 + math.exp(-s)) for s in raw.scores], **FP32_REORDERED)
    package = [float(oracle.predict([query], [d], normalize=True)[0]) for d in SENTENCES]
    assert package == pytest.approx(
        [1 / (1 + math.exp(-(s - oracle.estimated_max / 2))) for s in raw.scores], **FP32_REORDERED
    )


@module_loop
async def test_long_documents_chunk_into_windows_the_package_scores_whole(
    stub: pb_grpc.RerankerStub, model_dir: Path
) -> None:
    """Windows fit beside the template and the query (the package cuts none of them); a passage scores as its best."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(test_config(model_dir), str(model_dir), "m")
    query, passage = "what is panda?", " ".join(SENTENCES[:6])
    options = Options(max_length=64, instruction=INSTRUCTION)
    windows = engine.splitter(options, engine.tokenizer).split(query, passage)
    assert 2 < len(windows) <= 16
    for w in windows[1:]:  # the first is the passage itself, cut as TRUNCATE cuts it
        assert len(engine.encode([(query, w)], options)[0]) < 64 + engine.encoder.overhead  # whole: nothing cut
    resp = await stub.Rerank(
        pb.RerankRequest(
            query=query,
            candidates=[passage],
            max_length=64,
            instruction=INSTRUCTION,
            long_documents=pb.LONG_DOCUMENTS_CHUNK,
        )  # fmt: skip
    )
    assert resp.usage.windows == len(windows)
    want = max(expected(package(model_dir, 64), query, windows, INSTRUCTION))
    assert resp.scores[0] == pytest.approx(want, **FP32_REORDERED)


@module_loop
async def test_options_the_family_does_not_take_are_refused(stub: pb_grpc.RerankerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rerank(pb.RerankRequest(query="q", candidates=["d"], query_max_length=8))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mxbai-rerank-v2 reranker: it does not take query_max_length (it takes instruction)" in str(
        caught.value.details()
    )


def test_detection_by_name_only(model_dir: Path, tmp_path: Path) -> None:
    """Its config and tokenizer are any Qwen2's: `auto` takes the family from a name containing mxbai-rerank ... v2,
    else refuses in one line naming --model-type mxbai-rerank-v2; the operator may name it."""
    assert model_kind(str(model_dir)) == MODEL_TYPE
    unnamed = tmp_path / "qwen2-tiny"
    shutil.copytree(model_dir, unnamed)
    assert json.loads((unnamed / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    for name in ("", "mixedbread-ai/mxbai-rerank-base-v1", "my-org/qwen2-v2"):
        with pytest.raises(ModelLoadError) as caught:
            model_kind(str(unnamed), name=name)
        message = str(caught.value)
        assert "cannot be told for certain" in message and "\n" not in message
        assert "--model-type mxbai-rerank-v2" in message
    for name in ("mixedbread-ai/mxbai-rerank-base-v2", "mixedbread-ai/mxbai-rerank-large-v2", "me/MXBAI-RERANK-v2-ft"):
        assert model_kind(str(unnamed), name=name) == MODEL_TYPE
    assert model_kind(str(unnamed), MODEL_TYPE) == MODEL_TYPE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(test_config(unnamed, model_type=MODEL_TYPE), str(unnamed), "m")
    assert engine.family == FAMILY and engine.max_width == 512 + engine.encoder.overhead


def test_inputs_through_a_tokenizer_worker_equal_in_process(model_dir: Path) -> None:
    """The encoder (template in parts, the model's position limit) pickles to a worker process: the same ids."""
    from server.tokenize.workers import TokenizerWorkers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(test_config(model_dir), str(model_dir), "m")
    pairs = [("what is panda?", s) for s in SENTENCES] + [(LONG[:3000], LONG)]
    workers = TokenizerWorkers(engine.encoder, 1)
    workers.start()
    try:
        for o in (None, Options(instruction=INSTRUCTION, max_length=64)):
            ours, theirs = workers.encode(pairs, o), engine.encode(pairs, o)
            assert [list(e.input_ids) for e in ours] == [list(e.input_ids) for e in theirs]
    finally:
        workers.close()
