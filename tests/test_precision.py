"""--dtype: fp32 exact by default, bf16 only on a CPU that has it, int8 through ONNX Runtime, each approximate mode's
drift measured at load and reported (startup line, GetModelInfo, metric), refused past the operator's bound."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import __main__ as entry
from server.app import RerankServer
from server.config import ConfigError, load_config, parse_dtypes
from server.engine import drift, precision
from server.engine.model import ModelLoadError, RerankerModel
from tests.conftest import FP32_REORDERED, test_config
from tests.ops_helpers import free_port, sample, scrape
from tools.make_model import SENTENCES, build_model

QUERY = "what is panda?"
PASSAGES = SENTENCES[:8]
HAS_BF16 = precision.native_bf16(precision.CPUINFO) is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="the [int8] extra (onnxruntime, onnx) is not installed")


@pytest.fixture
def no_bf16_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A /proc/cpuinfo of an AVX-512 CPU without bf16 (a Skylake server), read instead of this machine's."""
    fake = tmp_path / "cpuinfo"
    flags = "fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"
    fake.write_text(
        f"processor\t: 0\nmodel name\t: Fake Xeon\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    monkeypatch.setattr(precision, "CPUINFO", str(fake))


def test_dtype_flag_per_model_and_from_the_environment() -> None:
    two = ["a", "b"]
    assert parse_dtypes("", two) == {"a": "auto", "b": "auto"}
    assert parse_dtypes("bf16", two) == {"a": "bf16", "b": "bf16"}
    assert parse_dtypes("b=INT8, bf16", two) == {"a": "bf16", "b": "int8"}
    for bad, why in (("fp8", "must be one of"), ("c=bf16", "not one of the served models"), ("bf16,int8", "one value")):
        with pytest.raises(ConfigError, match=why):
            parse_dtypes(bad, two)
    c = load_config(["--model", "a=/m/a", "--model", "b=/m/b", "--dtype", "b=int8", "--max-drift", "0.05"], env={})
    assert (c.dtype_of("a"), c.dtype_of("b"), c.max_drift) == ("auto", "int8", 0.05)
    env = {"RERANKER_DTYPE": "bf16", "RERANKER_MIN_RANK_CORRELATION": "0.9", "RERANKER_QUANTIZE_CACHE": "/q"}
    c = load_config(["--model", "/m/a"], env=env)
    assert (c.dtype_of("a"), c.min_rank_correlation, c.quantize_cache) == ("bf16", 0.9, "/q")
    for argv in (["--dtype", "c=bf16"], ["--max-drift", "-1"], ["--min-rank-correlation", "2"]):
        with pytest.raises(SystemExit):
            load_config(["--model", "a=/m/a", *argv], env={})


def test_modes_resolve_by_device(no_bf16_cpu: None) -> None:
    assert precision.resolve("auto", "cpu", None) == "fp32"
    assert precision.resolve("auto", "cpu", True) == "fp32"  # --fp16 never applied on CPU
    assert precision.resolve("auto", "cuda:0", None) == "fp16"
    assert precision.resolve("auto", "cuda:0", False) == "fp32"
    assert precision.resolve("int8", "cpu", None) == "int8"
    with pytest.raises(precision.PrecisionError, match="fp16 is for CUDA"):
        precision.resolve("fp16", "cpu", None)
    with pytest.raises(precision.PrecisionError, match="int8 is a CPU mode"):
        precision.resolve("int8", "cuda:0", None)


def test_bf16_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    for flags, found in (
        ("avx2 avx512f avx512_bf16", "avx512_bf16"),
        ("avx2 amx_tile amx_bf16", "amx_bf16"),
        ("avx2", None),
    ):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert precision.native_bf16(str(info)) == found


async def test_bf16_on_a_cpu_without_it_is_refused_at_start_with_one_line(
    model_dir: Path, no_bf16_cpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ModelLoadError, match=r"--dtype bf16 refused: this CPU has no native bf16 \(avx512_bf16 or"):
        RerankerModel(test_config(model_dir, dtype="bf16"))
    caplog.set_level(logging.ERROR)
    assert await entry.serve(test_config(model_dir, dtype="bf16")) == 1
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot start")]
    assert line.startswith("cannot start: --dtype bf16 refused") and "\n" not in line


def test_drift_sample_is_fixed_and_varied(engine: Any) -> None:
    pairs = drift.sample_pairs(engine.tokenizer, 512)
    assert pairs == drift.sample_pairs(engine.tokenizer, 512) and len(pairs) == drift.SAMPLE_PAIRS
    lengths = sorted(len(e) for e in engine.encode(pairs))
    assert lengths[0] < 32 and lengths[-1] >= 256  # short and long passages
    assert drift.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert drift.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert drift.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share a rank
    d = drift.compare([0.0, 1.0, 2.0], [0.0, 1.5, 1.75])
    assert (d.pairs, d.max_abs_diff) == (3, 0.5) and d.rank_correlation == pytest.approx(1.0)
    with pytest.raises(drift.DriftTooLarge, match="above --max-drift 0.1"):
        drift.check_bound(d, "int8", 0.1, -1.0)
    drift.check_bound(d, "int8", 0.0, 1.0)  # 0: no bound; the order is kept


async def _model_info(srv: RerankServer, name: str = "") -> pb.GetModelInfoResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        return await pb_grpc.RerankerStub(ch).GetModelInfo(pb.GetModelInfoRequest(model=name))


async def _rerank(srv: RerankServer, name: str, calls: int = 6) -> list[list[float]]:
    """`calls` concurrent requests (batched together), each scoring PASSAGES in input order."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        answers = await asyncio.gather(
            *(stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES, model=name)) for _ in range(calls))
        )
    return [list(a.scores) for a in answers]


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _fp32(engine: Any) -> list[float]:
    return engine.score([(QUERY, p) for p in PASSAGES])


async def test_fp32_stays_the_exact_default(model_dir: Path, engine: Any, flag_reranker: Any) -> None:
    assert (engine.mode, engine.dtype, engine.backend, engine.drift) == ("fp32", "float32", "torch", None)
    srv = RerankServer(test_config(model_dir), engine=engine)
    await srv.start()
    try:
        info = await _model_info(srv)
        [scores, *_] = await _rerank(srv, "", 1)
    finally:
        await srv.stop(0)
    assert (info.dtype, info.backend, info.HasField("drift")) == ("float32", "torch", False)
    expected = flag_reranker.compute_score([[QUERY, p] for p in PASSAGES])
    assert scores == pytest.approx(expected, **FP32_REORDERED)


@needs_bf16
async def test_bf16_reports_its_drift_everywhere(
    model_dir: Path, engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    srv = RerankServer(test_config(model_dir, dtype="bf16", metrics_port=free_port()))
    await srv.start()
    try:
        info = await _model_info(srv)
        answers = await _rerank(srv, "")
        m = await asyncio.to_thread(scrape, srv.metrics_port)
    finally:
        await srv.stop(0)
    d = srv.service.models[model_dir.name].engine.drift
    assert (info.dtype, info.backend, info.drift.pairs) == ("bfloat16", "torch", drift.SAMPLE_PAIRS)
    assert info.drift.max_abs_diff == pytest.approx(d.max_abs_diff) and 0 < d.max_abs_diff < 0.5
    assert info.drift.rank_correlation == pytest.approx(d.rank_correlation) and d.rank_correlation > 0.9
    labels = {"model": model_dir.name, "dtype": "bfloat16"}
    assert sample(m, "reranker_score_drift", stat="max_abs_diff", **labels) == pytest.approx(d.max_abs_diff)
    assert sample(m, "reranker_score_drift", stat="rank_correlation", **labels) == pytest.approx(d.rank_correlation)
    [serving] = [r for r in caplog.records if r.getMessage() == "serving"]
    models = serving.fields["models"]  # type: ignore[attr-defined]
    assert "bfloat16" in models and "drift max" in models and "rank correlation" in models
    # bf16 rounds each batch's sums by its shape: a pair's score moves with its batch-mates by a few bf16 steps
    # (up to 3.9e-3 measured here; 1 run in 25 of this test batched the six calls so), within the drift bound.
    assert all(a == pytest.approx(_fp32(engine), abs=d.max_abs_diff * 4 + 1e-2) for a in answers)


@needs_bf16
def test_a_mode_past_the_operators_bound_refuses_to_serve(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"moves this model's scores by up to .* above --max-drift 1e-09"):
        RerankerModel(test_config(model_dir, dtype="bf16", max_drift=1e-9))
    with pytest.raises(ModelLoadError, match=r"below --min-rank-correlation 1"):
        RerankerModel(test_config(model_dir, dtype="bf16", min_rank_correlation=1.0))


@needs_ort
async def test_int8_beside_fp32_with_workers_cache_and_reload(model_dir: Path, engine: Any, tmp_path: Path) -> None:
    live, cache = tmp_path / "live", tmp_path / "int8-cache"
    shutil.copytree(model_dir, live)
    config = test_config(
        model_dir, model=f"exact={model_dir},fast={live}", dtype="fast=int8", quantize_cache=str(cache),
        tokenize_workers=1,
    )  # fmt: skip
    srv = RerankServer(config)
    await srv.start()
    try:
        fast = srv.service.models["fast"].engine
        assert (fast.backend, fast.dtype, fast.model) == ("onnxruntime", "int8", None)  # the fp32 weights are freed
        assert "converted now" in fast.conversion and str(cache) in fast.conversion
        [conversion] = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert conversion.name.startswith(fast.revision) and (conversion / "model-int8.onnx").is_file()
        assert _names(live) == _names(model_dir)  # nothing added
        info, exact_info = await _model_info(srv, "fast"), await _model_info(srv, "exact")
        assert (info.dtype, info.backend, info.drift.pairs) == ("int8", "onnxruntime", drift.SAMPLE_PAIRS)
        assert (exact_info.dtype, exact_info.HasField("drift")) == ("float32", False)
        fast_scores, exact_scores = await asyncio.gather(_rerank(srv, "fast"), _rerank(srv, "exact"))
        for scores in exact_scores:  # batched with the int8 model's calls: exact as ever (within float reordering)
            assert scores == pytest.approx(_fp32(engine), **FP32_REORDERED)
        assert all(s == pytest.approx(fast_scores[0], abs=1e-6) for s in fast_scores)  # however they were batched
        assert fast_scores[0] != exact_scores[0]
        assert fast_scores[0] == pytest.approx(exact_scores[0], abs=info.drift.max_abs_diff * 4 + 1e-2)

        again = RerankerModel(config, str(live), "fast")  # a restart: the conversion is found, not redone
        assert "cached" in again.conversion and again.drift == fast.drift
        assert again.score([(QUERY, p) for p in PASSAGES]) == pytest.approx(fast_scores[0], abs=1e-6)
        alone = [again.score([(QUERY, p)])[0] for p in PASSAGES]  # a pair's int8 score is its own, batch or not
        assert alone == pytest.approx(fast_scores[0], abs=1e-6)

        other = build_model(tmp_path / "other", "tiny", seed=1)
        for f in other.iterdir():  # the tokenizer too: two trainings of the tiny tokenizer differ (Rust hash order)
            shutil.copy(f, live / f.name)
        assert await srv.reloader.reload() == {"exact": "unchanged", "fast": "ok"}
        reloaded = srv.service.models["fast"].engine
        assert reloaded.revision != fast.revision and reloaded.backend == "onnxruntime"
        assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # one per revision
        new_scores = (await _rerank(srv, "fast", 1))[0]
        assert new_scores != pytest.approx(fast_scores[0], abs=1e-3)
        assert new_scores == pytest.approx(RerankerModel(test_config(other)).score([(QUERY, p) for p in PASSAGES]),
                                           abs=reloaded.drift.max_abs_diff * 4 + 1e-2)  # fmt: skip
    finally:
        await srv.stop(0)


def test_int8_without_onnxruntime_says_which_extra(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ort(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ModelLoadError, match=r"pip install 'reranker-service\[int8\]'"):
        RerankerModel(test_config(model_dir, dtype="int8", quantize_cache=str(model_dir.parent / "unused")))
