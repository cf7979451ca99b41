"""The device side: shape buckets, prepared attention masks that need no host sync, and bucketed scores."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.engine.buckets import Buckets
from server.engine.launch import Launcher
from server.engine.load import load_engine
from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import SENTENCES, build_llm_model

PAIRS = [("what is panda?", s) for s in SENTENCES[:5]] + [("hi", "the giant panda " * 12)]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_llm_model(tmp_path_factory.mktemp("bge-reranker-qwen2"), arch="qwen2")
    return load_engine(test_config(path), str(path), "qwen2")


@pytest.fixture(params=["cross-encoder", "llm"])
def model(request: pytest.FixtureRequest, engine: Any, qwen2: Any) -> Any:
    return engine if request.param == "cross-encoder" else qwen2


def test_buckets_pad_up_to_the_next_size_within_the_budget() -> None:
    b = Buckets.fit(max_width=512, batch_size=256, max_tokens=256 * 512)
    assert b.widths == (32, 64, 128, 192, 256, 320, 384, 448, 512)
    assert b.rows == (8, 16, 32, 64, 128, 256)
    assert b.shape(1, 10) == (8, 32) and b.shape(9, 33) == (16, 64) and b.shape(256, 512) == (256, 512)
    assert b.shape(300, 600) == (300, 600)  # past the largest bucket: exact
    assert len(b.shapes()) == 54 and b.shapes()[0] == (256, 512) and b.shapes()[-1] == (8, 32)
    small = Buckets.fit(max_width=512, batch_size=64, max_tokens=8192)
    assert small.shape(20, 200) == (32, 256) and small.shape(40, 200) == (40, 256)  # 64 x 256: over the budget
    assert all(r * w <= 8192 for r, w in small.shapes())
    assert Buckets.fit(max_width=100, batch_size=8, max_tokens=800, multiple=8).widths == (32, 64, 104)


def test_bucketed_batches_score_as_exact_ones(model: Any) -> None:
    """Rows and width padded up to a bucket (extra rows, extra masked columns) change no score: the padding is
    masked and the extra rows' scores are dropped."""
    bucketed = copy.copy(model)
    bucketed.launcher = copy.copy(model.launcher)
    bucketed.launcher.buckets = Buckets.fit(model.max_width, 16, 16 * 512, getattr(model, "pad_multiple", 1))
    batch = model.encode(PAIRS)
    assert bucketed.launcher.shape(len(batch), max(map(len, batch))) != (len(batch), max(map(len, batch)))
    assert bucketed.forward(batch) == pytest.approx(model.forward(batch), **FP32_REORDERED)


def _on_meta(model: Any, masks_4d: bool) -> torch.Tensor:
    """A padded batch through the model's forward with weights and inputs on the meta device, where any Python-side
    read of a tensor's value (a host sync on CUDA) raises."""
    meta = copy.copy(model)
    meta.model = copy.deepcopy(model.model).to("meta")
    forward = model.launcher.forward.__func__.__get__(meta)  # the model's own forward function, on the meta copy
    launcher = Launcher(meta.model, "meta", forward, model.launcher.causal, None)
    launcher.masks_4d = masks_4d
    batch = model.encode(PAIRS)
    arrays = model._arrays(batch, len(batch), max(map(len, batch)) + 3)
    with torch.inference_mode():
        return launcher.run({k: torch.from_numpy(a).to("meta") for k, a in arrays.items()}, masked=True)


def test_the_forward_pass_reads_no_device_value(model: Any) -> None:
    """With the prepared 4D mask nothing in the model's forward reads a tensor's value on the host; transformers' own
    2D-mask path does (its `padding_mask.all()`), which shows the check can fail."""
    assert model.launcher.masks_4d
    out = _on_meta(model, masks_4d=True)
    assert out.shape == (len(PAIRS),) and out.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        _on_meta(model, masks_4d=False)


def test_a_model_that_refuses_prepared_masks_keeps_its_own(engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if inputs["attention_mask"].dim() == 4:
            raise ValueError("a 4D mask is not for me")
        return engine._logits(inputs)

    launcher = Launcher(engine.model, "cpu", forward, causal=False, buckets=None)
    batch = engine.encode(PAIRS)
    caplog.set_level(logging.WARNING, logger="server.engine.launch")
    launcher.check_masks(engine._arrays(batch, len(batch), max(map(len, batch))))
    assert not launcher.masks_4d
    assert "does not take a prepared 4D mask (ValueError: a 4D mask is not for me)" in caplog.text
    arrays = engine._arrays(batch, len(batch), max(map(len, batch)))
    assert launcher.launch(arrays, len(batch))() == pytest.approx(engine.forward(batch), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the host-sync check needs a CUDA device")
def test_launch_makes_no_host_sync_on_cuda(model_dir: Path) -> None:
    from server.engine.model import RerankerModel
    from server.engine.warm import prepare

    engine = RerankerModel(test_config(model_dir, device="cuda"))
    prepare(engine, engine.batching(test_config(model_dir, device="cuda")), "off")
    batch = engine.encode(PAIRS)
    torch.cuda.set_sync_debug_mode("error")
    try:
        collect = engine.launch(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(collect()).all()
