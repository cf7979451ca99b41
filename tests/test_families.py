"""Every reranker family behind one contract: each scored as its oracle scores it, through a real server and channel,
alone and batched with other requests; per-request instruction and layer settings; detection that never guesses."""

from __future__ import annotations

import asyncio
import json
import math
import re
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.engine.lightweight import load_lightweight
from server.engine.llm_model import load_flag_reranker, model_kind
from server.engine.model import ModelLoadError
from server.tokenize.chat import QWEN3_RERANKER
from server.tokenize.options import Options
from server.tokenize.packed import pack, unpack
from server.tokenize.workers import TokenizerWorkers
from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import (
    SENTENCES,
    build_layerwise_model,
    build_lightweight_model,
    build_llm_model,
    build_qwen3_reranker,
)

module_loop = pytest.mark.asyncio(loop_scope="module")  # the tests share one server, on one event loop

QUERIES = SENTENCES[:4]
LONG = ("what is panda? " * 20, "The giant panda is a bear. " * 80)  # cut to fit max_length


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "qwen3": build_qwen3_reranker(tmp_path_factory.mktemp("qwen3-tiny")),
            "light": build_lightweight_model(tmp_path_factory.mktemp("lightweight-tiny")),
            "layer": build_layerwise_model(tmp_path_factory.mktemp("layerwise-tiny"), 2),
            "gemma": build_llm_model(tmp_path_factory.mktemp("bge-reranker-tiny-gemma"), 1, "gemma"),
        }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(paths: dict[str, Path], model_dir: Path) -> AsyncIterator[pb_grpc.RerankerStub]:
    """One server with every family, each detected by `--model-type auto` (the gemma one by its bge-reranker name)."""
    models = ",".join(f"{n}={p}" for n, p in [("ce", model_dir), *paths.items()])
    srv = RerankServer(test_config(model_dir, model=models))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            yield pb_grpc.RerankerStub(channel)
    finally:
        await srv.stop(0)


class Qwen3Reference:
    """Qwen3-Reranker's model card code, written plainly: full logits, left padding, log_softmax over no/yes."""

    def __init__(self, path: Path, max_length: int = 512) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.yes, self.no = self.tok.convert_tokens_to_ids("yes"), self.tok.convert_tokens_to_ids("no")
        self.max_length = max_length
        prefix = (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
            'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        )
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix = self.tok.encode(prefix, add_special_tokens=False)
        self.suffix = self.tok.encode(suffix, add_special_tokens=False)

    def __call__(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[float]:
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        inputs = self.tok(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix) - len(self.suffix),
        )
        inputs["input_ids"] = [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            padded = self.tok.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        with torch.no_grad():
            last = self.model(**padded).logits[:, -1, :]
        pair = torch.stack([last[:, self.no], last[:, self.yes]], dim=1)
        return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()


def _request(query: str, candidates: Sequence[str], model: str, **fields: Any) -> pb.RerankRequest:
    return pb.RerankRequest(query=query, candidates=list(candidates), model=model, **fields)


@module_loop
async def test_qwen3_scores_p_yes_as_its_model_card_alone_and_batched(
    stub: pb_grpc.RerankerStub, paths: dict[str, Path]
) -> None:
    ref = Qwen3Reference(paths["qwen3"])
    calls = [_request(q, SENTENCES, "qwen3", normalize=True) for q in QUERIES]
    calls.append(_request(LONG[0], [LONG[1], "hi"], "qwen3", normalize=True))
    calls.append(_request(QUERIES[0], SENTENCES[:3], "qwen3", normalize=True, instruction="Find the answer, briefly"))
    responses = await asyncio.gather(*(stub.Rerank(r) for r in calls))  # concurrent: the batcher mixes them
    for req, resp in zip(calls, responses, strict=True):
        pairs = [(req.query, c) for c in req.candidates]
        instruction = req.instruction or None
        alone = [ref([p], instruction)[0] for p in pairs]
        assert list(resp.scores) == pytest.approx(alone, **FP32_REORDERED)
        assert list(resp.scores) == pytest.approx(ref(pairs, instruction), **FP32_REORDERED)
    assert len({round(s, 4) for s in responses[0].scores}) > 3  # the pairs are told apart
    instructed, default = responses[-1].scores, responses[0].scores[:3]
    assert list(instructed) != pytest.approx(list(default), abs=1e-4)  # the instruction reaches the model
    raw = await stub.Rerank(_request(QUERIES[1], SENTENCES, "qwen3"))
    p_yes = [1 / (1 + math.exp(-s)) for s in raw.scores]  # raw = logit(yes) - logit(no): its sigmoid is P(yes)
    assert p_yes == pytest.approx(list(responses[1].scores), **FP32_REORDERED)


@module_loop
async def test_lightweight_knobs_per_request_equal_compute_score(
    stub: pb_grpc.RerankerStub, paths: dict[str, Path]
) -> None:
    ref = load_lightweight(str(paths["light"]), devices=["cpu"], use_fp16=False)
    settings: list[dict[str, Any]] = [
        {},
        {"cutoff_layers": [3]},
        {"compress_ratio": 2, "compress_layers": [2]},
        {"compress_ratio": 4, "compress_layers": [1, 3], "cutoff_layers": [5], "instruction": "Is B about A?"},
        {"compress_ratio": 8, "query_max_length": 4},
    ]
    calls = [_request(q, [*SENTENCES, LONG[1]], "light", **s) for q in QUERIES[:2] for s in settings]
    responses = await asyncio.gather(*(stub.Rerank(r) for r in calls))  # concurrent, settings batched apart
    for req, resp in zip(calls, responses, strict=True):
        kwargs = {k: v for k, v in (
            ("cutoff_layers", list(req.cutoff_layers)), ("compress_layers", list(req.compress_layers)),
            ("compress_ratio", req.compress_ratio), ("prompt", req.instruction),
            ("query_max_length", req.query_max_length),
        ) if v}  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = ref.compute_score([[req.query, c] for c in req.candidates], **kwargs)
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED), kwargs
    by_setting = [tuple(round(s, 4) for s in r.scores) for r in responses[: len(settings)]]
    assert len(set(by_setting)) == len(settings)  # each knob changes the scores


@module_loop
async def test_layerwise_cutoff_layer_per_request_equals_compute_score(
    stub: pb_grpc.RerankerStub, paths: dict[str, Path]
) -> None:
    ref = load_flag_reranker(str(paths["layer"]), "layerwise", devices=["cpu"], use_fp16=False)
    calls = [_request(q, SENTENCES, "layer", cutoff_layers=layers) for q in QUERIES[:2] for layers in ([], [2], [3])]
    responses = await asyncio.gather(*(stub.Rerank(r) for r in calls))
    for req, resp in zip(calls, responses, strict=True):
        kwargs = {"cutoff_layers": list(req.cutoff_layers)} if req.cutoff_layers else {}
        expected = ref.compute_score([[req.query, c] for c in req.candidates], **kwargs)
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)


@module_loop
async def test_llm_reranker_instruction_is_compute_scores_prompt(
    stub: pb_grpc.RerankerStub, paths: dict[str, Path]
) -> None:
    ref = load_flag_reranker(str(paths["gemma"]), "llm", devices=["cpu"], use_fp16=False)
    prompt = "Does passage B answer query A? Say 'Yes' or 'No'."
    calls = [_request(q, SENTENCES, "gemma", instruction=i) for q in QUERIES[:2] for i in ("", prompt)]
    responses = await asyncio.gather(*(stub.Rerank(r) for r in calls))
    for req, resp in zip(calls, responses, strict=True):
        kwargs = {"prompt": req.instruction} if req.instruction else {}
        expected = ref.compute_score([[req.query, c] for c in req.candidates], **kwargs)
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
    assert list(responses[0].scores) != pytest.approx(list(responses[1].scores), abs=1e-4)


@module_loop
async def test_cross_encoder_query_max_length_equals_compute_score(
    stub: pb_grpc.RerankerStub, flag_reranker: Any
) -> None:
    pairs = [(LONG[0], c) for c in [*SENTENCES, LONG[1]]]
    for query_max, max_length in ((8, 0), (20, 64)):
        req = pb.RerankRequest(
            pairs=[pb.Pair(query=q, passage=p) for q, p in pairs], query_max_length=query_max, max_length=max_length
        )
        resp = await stub.Rerank(req)
        expected = flag_reranker.compute_score(
            [list(p) for p in pairs], query_max_length=query_max, max_length=max_length or 512
        )
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)


@module_loop
@pytest.mark.parametrize(
    ("model", "fields", "says"),
    [
        ("ce", {"instruction": "rank well"}, r"model 'ce' is a cross-encoder reranker: it does not take instruction"),
        ("ce", {"cutoff_layers": [2]}, r"does not take cutoff_layers \(it takes query_max_length\)"),
        ("gemma", {"compress_ratio": 2}, r"'gemma' is a bge-llm reranker: it does not take compress_ratio"),
        ("qwen3", {"query_max_length": 8}, r"qwen3-reranker reranker: it does not take query_max_length"),
        ("light", {"compress_ratio": 3}, r"compress_ratio 3 is not one of 1, 2, 4, 8"),
        ("light", {"cutoff_layers": [1]}, r"cutoff_layers \[1\]: .* one of 2, 3, 4, 5, 6"),
        ("light", {"compress_layers": [0]}, r"compress_layers \[0\]: each must be one of 1\.\.5"),
        ("layer", {"cutoff_layers": [2, 3]}, r"cutoff_layers \[2, 3\]: .* one of 2\.\.4"),
        ("layer", {"instruction": " \n"}, r"instruction is empty"),
        ("gemma", {"instruction": "x" * 20_001}, r"instruction has 20001 characters; the limit is 20000"),
        ("ce", {"query_max_length": 600}, r"query_max_length 600 is above the pair's max_length of 512"),
        ("qwen3", {"max_length": 40}, r"max_length 40 leaves no room for a pair: .*template alone takes \d+ tokens"),
    ],
)
async def test_options_a_model_cannot_honour_are_refused(
    stub: pb_grpc.RerankerStub, model: str, fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rerank(_request("q", ["a passage"], model, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() is not None

    assert re.search(says, caught.value.details()), caught.value.details()
    ok = await stub.Rerank(_request("q", ["a passage"], model))  # the server serves on
    assert len(ok.scores) == 1


@module_loop
async def test_model_info_names_each_family_and_its_default_instruction(stub: pb_grpc.RerankerStub) -> None:
    expected = {
        "ce": ("cross-encoder", ""),
        "qwen3": ("qwen3-reranker", QWEN3_RERANKER.default_instruction),
        "light": ("bge-lightweight", "Predict whether passage B contains an answer to query A."),
        "layer": ("bge-layerwise", "Given a query A and a passage B, determine whether the passage contains"),
        "gemma": ("bge-llm", "Given a query A and a passage B, determine whether the passage contains"),
    }
    for name, (family, instruction) in expected.items():
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(model=name))
        assert info.family == family
        assert info.default_instruction.startswith(instruction) and bool(info.default_instruction) == bool(instruction)


def test_detection_of_causal_lms_never_guesses(paths: dict[str, Path], tmp_path: Path) -> None:
    assert model_kind(str(paths["qwen3"])) == "qwen3-reranker"  # Qwen3 config + the template's tokens
    assert model_kind(str(paths["light"])) == "lightweight"
    assert model_kind(str(paths["layer"])) == "layerwise"
    assert model_kind(str(paths["gemma"])) == "llm"  # by its bge-reranker name
    # The same gemma weights under another name, and a Qwen3 LM whose tokenizer lacks the template's tokens: refused.
    unnamed = tmp_path / "my-model"
    unnamed.mkdir()
    for f in paths["gemma"].iterdir():
        (unnamed / f.name).write_bytes(f.read_bytes())
    plain_qwen3 = tmp_path / "plain"
    plain_qwen3.mkdir()
    (plain_qwen3 / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    for path in (unnamed, plain_qwen3):
        with pytest.raises(ModelLoadError) as caught:
            model_kind(str(path))
        message = str(caught.value)
        assert "cannot be told for certain" in message and "\n" not in message
        assert "--model-type llm" in message and "qwen3-reranker" in message
    assert model_kind(str(unnamed), "llm") == "llm"  # the operator names the recipe
    assert model_kind(str(plain_qwen3), name="Qwen/Qwen3-Reranker-0.6B") == "qwen3-reranker"  # or its name does


def test_chat_and_lightweight_inputs_through_a_worker_equal_in_process(paths: dict[str, Path]) -> None:
    """The Qwen3 and lightweight encoders pickle to a worker: ids, forward settings and spans come back intact."""
    from server.engine.load import load_engine

    config = test_config(paths["qwen3"])
    pairs = [("what is panda?", s) for s in SENTENCES] + [LONG]
    for name in ("qwen3", "light"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = load_engine(config, str(paths[name]), name)
        options = Options(instruction="Judge B", max_length=128)
        if name == "light":
            options = Options(instruction="Judge B", cutoff_layers=(3,), compress_ratio=2, compress_layers=(2,))
        workers = TokenizerWorkers(engine.encoder, 1)
        workers.start()
        try:
            for o in (None, options):
                ours, theirs = workers.encode(pairs, o), engine.encode(pairs, o)
                assert [(list(e.input_ids), e.forward, e.spans) for e in ours] == [
                    (list(e.input_ids), e.forward, e.spans) for e in theirs
                ]
                assert engine.forward(ours) == pytest.approx(engine.forward(theirs), abs=1e-6)
        finally:
            workers.close()
        assert [e.spans for e in unpack(pack(theirs))] == [e.spans for e in theirs]


@module_loop
async def test_qwen3_long_documents_chunk_scores_each_window_whole(
    stub: pb_grpc.RerankerStub, paths: dict[str, Path]
) -> None:
    """Windows fit beside the template and the query (none is cut), and the passage scores as its best window."""
    from server.engine.load import load_engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(test_config(paths["qwen3"]), str(paths["qwen3"]), "qwen3")
    query, passage, instruction = "what is panda?", " ".join(SENTENCES[:6]), "Find facts"
    options = Options(max_length=128, instruction=instruction)
    windows = engine.splitter(options, engine.tokenizer).split(query, passage)
    assert 2 < len(windows) <= 16
    for w in windows[1:]:  # the first is the passage itself, cut as TRUNCATE cuts it
        assert len(engine.encode([(query, w)], options)[0]) < 128  # whole: nothing truncated
    resp = await stub.Rerank(
        _request(
            query,
            [passage],
            "qwen3",
            max_length=128,
            instruction=instruction,
            normalize=True,
            long_documents=pb.LONG_DOCUMENTS_CHUNK,
        )  # fmt: skip
    )
    ref = Qwen3Reference(paths["qwen3"], max_length=128)
    assert resp.usage.windows == len(windows)
    assert resp.scores[0] == pytest.approx(max(ref([(query, w)], instruction)[0] for w in windows), **FP32_REORDERED)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_cpu_modes_of_cross_encoders_are_refused_by_decoder_only_families(paths: dict[str, Path], dtype: str) -> None:
    from server.engine.precision import CPUINFO, native_bf16

    if dtype == "bf16" and native_bf16(CPUINFO) is None:
        pytest.skip("this CPU has no native bf16: --dtype bf16 is refused for every model here")
    from server.engine.load import load_engine

    with pytest.raises(ModelLoadError, match=rf"--dtype {dtype} for model 'qwen3': the decoder-only rerankers"):
        config = test_config(paths["qwen3"], model=f"qwen3={paths['qwen3']}", dtype=dtype)
        load_engine(config, str(paths["qwen3"]), "qwen3")
