"""PENDING, not collected (its name is not test_*.py): mxbai-rerank v2 served exactly as the published `mxbai-rerank`
package scores it, through a real server and channel, alone and batched with other requests.

To wire it once the LLM-family seam serves the family (see /work/notes/issue-22b.md for the recipe):
  1. pin `"mxbai-rerank==0.1.6"` in pyproject's test extra and `pip install mxbai-rerank==0.1.6` (it adds
     `batched==0.1.5` and nothing else: `pip install --dry-run` changes no pinned package);
  2. set MODEL_TYPE and FAMILY below to the family's --model-type value and GetModelInfo's `family`;
  3. rename this file to tests/test_mxbai_rerank_v2.py.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from tests.conftest import test_config
from tools.make_model import SENTENCES, build_mxbai_v2_model

MODEL_TYPE = "mxbai-rerank-v2"  # the family's --model-type value
FAMILY = "mxbai-rerank-v2"  # and its GetModelInfo.family
ALONE_TOL = 1e-5  # fp32 on CPU: the package pads on the left without position ids, so rotary positions shift
BATCH_TOL = 1e-4  # ... and batch-mates of other widths add float rounding
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mxbai_v2_model(tmp_path_factory.mktemp("tiny-mxbai-v2"))


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Any:
    """The package's own reranker on the same weights; max_length as the server's default (the package's is 8192)."""
    from mxbai_rerank import MxbaiRerankV2

    reranker = MxbaiRerankV2(str(model_dir), device="cpu", torch_dtype=torch.float32, max_length=512)
    restore_prepare_for_model(reranker.tokenizer)
    return reranker


def expected(oracle: Any, query: str, documents: list[str], instruction: str | None = None) -> list[float]:
    """The package's raw scores, logit("1") - logit("0") at the last position, each pair in a call of its own."""
    return [float(oracle.predict([query], [d], instruction=instruction)[0]) for d in documents]


@pytest.fixture
async def stub(model_dir: Path) -> AsyncIterator[pb_grpc.RerankerStub]:
    srv = RerankServer(test_config(model_dir, model_type=MODEL_TYPE, max_wait_ms=50.0))
    try:
        await srv.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            yield pb_grpc.RerankerStub(channel)
    finally:
        await srv.stop(0)


async def test_alone_equals_the_package(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    for query in ["what is panda?", SENTENCES[5]]:
        resp = await stub.Rerank(pb.RerankRequest(query=query, candidates=SENTENCES))
        assert list(resp.scores) == pytest.approx(expected(oracle, query, SENTENCES), abs=ALONE_TOL)
        assert len({round(s, 4) for s in resp.scores}) >= len(SENTENCES) - 1


async def test_the_instruction_is_the_packages_instruction_line(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    query = "what is panda?"
    resp = await stub.Rerank(pb.RerankRequest(query=query, candidates=SENTENCES, instruction=INSTRUCTION))
    with_line = expected(oracle, query, SENTENCES, INSTRUCTION)
    assert list(resp.scores) == pytest.approx(with_line, abs=ALONE_TOL)
    assert with_line != pytest.approx(expected(oracle, query, SENTENCES), abs=1e-3)  # the line changes the scores
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.family == FAMILY and info.default_instruction == ""  # the package adds no line by default


async def test_long_texts_are_cut_as_the_package_cuts_them(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    documents = [LONG, LONG[100:], "hi"]
    for query in ["what is panda?", LONG[:3000]]:  # a query past 3/4 of max_length too
        resp = await stub.Rerank(pb.RerankRequest(query=query, candidates=documents))
        assert list(resp.scores) == pytest.approx(expected(oracle, query, documents), abs=ALONE_TOL)


async def test_requests_batched_together_equal_each_alone(stub: pb_grpc.RerankerStub, oracle: Any) -> None:
    requests = [
        pb.RerankRequest(
            query=SENTENCES[i], candidates=SENTENCES[i : i + 4] + [LONG[i * 50 :]], instruction=[INSTRUCTION, ""][i % 2]
        )
        for i in range(6)
    ]
    responses = await asyncio.gather(*(stub.Rerank(r) for r in requests))
    for req, resp in zip(requests, responses, strict=True):
        want = expected(oracle, req.query, list(req.candidates), req.instruction or None)
        assert list(resp.scores) == pytest.approx(want, abs=BATCH_TOL)


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
    assert list(normalized.scores) == pytest.approx([1 / (1 + math.exp(-s)) for s in raw.scores], abs=1e-6)
    package = [float(oracle.predict([query], [d], normalize=True)[0]) for d in SENTENCES]
    assert package == pytest.approx([1 / (1 + math.exp(-(s - oracle.estimated_max / 2))) for s in raw.scores], abs=1e-5)
