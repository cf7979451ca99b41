"""Shared fixtures: a tiny random-weight cross-encoder built once per session, and real gRPC servers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

# Tests never reach for the hub, whatever the environment exports: offline, and a closed loopback port as the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reranker_proto import reranker_pb2_grpc as pb_grpc  # noqa: E402
from server.app import RerankServer  # noqa: E402
from server.config import Config  # noqa: E402
from tests.pki import Pki, make_pki  # noqa: E402
from tools.make_model import build_model  # noqa: E402

# Our scores against a reference's (FlagReranker, transformers, a vendor's SDK, another request): fp32 on both sides,
# but batch shapes, padding and torch threads differ, so every sum is added in another order. The error is about
# absolute (the hidden states' scale, not the logit's), and FlagReranker moves as much against itself: compute_score
# of 8 x 12 requests' pairs in one call against pair by pair differed by up to 2.0e-5 (tiny model, scores to 5.1).
# Measured against it: 1.6e-5 on CI's CPU (an unpadded pair against a padded batch), up to 3.8e-5 here over 40 runs
# of test_batcher's 12 concurrent requests. A wrong recipe (prompt, token, truncation, normalization) moves scores by
# 1e-2 or more: the bound sits 5x above the noise and 50x below a defect.
FP32_REORDERED: dict[str, float] = {"rel": 1e-4, "abs": 2e-4}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-reranker"), "tiny")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> Any:
    from server.engine.model import RerankerModel

    return RerankerModel(test_config(model_dir))


@pytest.fixture(scope="session")
def flag_reranker(model_dir: Path) -> Any:
    """FlagEmbedding's own reranker on the same weights: the reference every score is checked against."""
    from FlagEmbedding import FlagReranker

    return FlagReranker(str(model_dir), devices=["cpu"], use_fp16=False)


def test_config(model_dir: Path, **overrides: Any) -> Config:
    # threads=1: the in-process servers share pytest's process, whose OpenMP threads spin (python -m server's
    # passive waits are set before torch loads, which pytest's process has done already)
    values: dict[str, Any] = {"model": str(model_dir), "host": "127.0.0.1", "port": 0, "grace_s": 2.0, "threads": 1}
    values.update(overrides)
    return Config(**values)


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@contextlib.asynccontextmanager
async def started(srv: RerankServer) -> AsyncIterator[pb_grpc.RerankerStub]:
    """`srv` started and a stub on it (`stub.server` is `srv`, for tests that read its batchers); stopped on the way
    out, also when a model fails to start (its workers and threads would keep pytest from exiting)."""
    try:
        await srv.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.RerankerStub(channel)
            stub.server = srv  # type: ignore[attr-defined]
            yield stub
    finally:
        await srv.stop(0)


@pytest.fixture
async def server(model_dir: Path, engine: Any) -> AsyncIterator[RerankServer]:
    srv = RerankServer(test_config(model_dir), engine=engine)
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest.fixture
async def channel(server: RerankServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.RerankerStub:
    return pb_grpc.RerankerStub(channel)
