"""A model whose code is not in transformers (auto_map in config.json, like jina-reranker-v2): served only with
--trust-remote-code, and then exactly as FlagReranker and CrossEncoder score it with that code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from FlagEmbedding import FlagReranker
from sentence_transformers import CrossEncoder
from transformers import BertForSequenceClassification

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.config import ConfigError, load_config
from server.engine.model import ModelLoadError, RerankerModel, revision
from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import SENTENCES, build_bert_model

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"

# The model's own code: BERT with a head of its own (the logit negated), so its scores show that this file ran, and a
# tokenizer class of its own (which the tokenizer worker processes must find too).
MODELING = """
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote-reranker"


class TinyRemoteForSequenceClassification(BertForSequenceClassification):
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = -out.logits
        return out


class TinyRemoteTokenizer(BertTokenizer):
    pass
"""


def _update_json(file: Path, **values: object) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **values}, indent=2))


def build_remote_code_model(directory: Path) -> Path:
    """The tiny BERT cross-encoder, its config.json and tokenizer_config.json pointing (auto_map) at a modeling file
    shipped beside them, under a model type transformers does not know."""
    path = build_bert_model(directory)
    (path / "modeling_tiny.py").write_text(MODELING)
    _update_json(
        path / "config.json",
        model_type="tiny-remote-reranker",
        architectures=["TinyRemoteForSequenceClassification"],
        auto_map={
            "AutoConfig": "modeling_tiny.TinyRemoteConfig",
            "AutoModelForSequenceClassification": "modeling_tiny.TinyRemoteForSequenceClassification",
        },
    )
    _update_json(
        path / "tokenizer_config.json",
        tokenizer_class="TinyRemoteTokenizer",
        auto_map={"AutoTokenizer": [None, "modeling_tiny.TinyRemoteTokenizer"]},  # [slow, fast]
    )
    return path


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_remote_code_model(tmp_path_factory.mktemp("tiny-remote-code"))


def test_without_the_flag_the_server_stops_with_one_line_naming_it(remote: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RERANKER_TRUST_REMOTE_CODE": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--model", str(remote)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "--trust-remote-code" in lines[0] and "RERANKER_TRUST_REMOTE_CODE" in lines[0]
    assert "modeling_tiny.TinyRemoteForSequenceClassification" in lines[0]  # which code it would run
    assert "AutoTokenizer -> modeling_tiny.TinyRemoteTokenizer" in lines[0]
    assert "permissions" in lines[0]  # and what the flag allows
    assert "Traceback" not in proc.stderr


def test_a_built_in_model_type_with_its_own_code_is_refused_too(remote: Path, tmp_path: Path) -> None:
    """jina-reranker-v2's config names XLMRobertaForSequenceClassification: untrusted, transformers would load its
    own class of that name with these weights and score wrongly without a word. The server refuses instead."""
    import shutil

    path = Path(shutil.copytree(remote, tmp_path / "as-bert"))
    _update_json(path / "config.json", model_type="bert", architectures=["BertForSequenceClassification"])
    _update_json(path / "tokenizer_config.json", tokenizer_class="BertTokenizer", auto_map={})
    with pytest.raises(ModelLoadError, match="ships its own model code .AutoConfig -> .*--trust-remote-code") as err:
        RerankerModel(test_config(path))
    assert "AutoTokenizer" not in str(err.value)


def test_the_flag_and_its_variable() -> None:
    assert load_config([], env={}).trust_remote_code is False
    assert load_config(["--trust-remote-code"], env={}).trust_remote_code is True
    assert load_config([], env={"RERANKER_TRUST_REMOTE_CODE": "1"}).trust_remote_code is True
    flag_wins = load_config(["--no-trust-remote-code"], env={"RERANKER_TRUST_REMOTE_CODE": "true"})
    assert flag_wins.trust_remote_code is False
    with pytest.raises(ConfigError, match="RERANKER_TRUST_REMOTE_CODE='perhaps': not a boolean"):
        load_config([], env={"RERANKER_TRUST_REMOTE_CODE": "perhaps"})


async def test_with_the_flag_its_code_scores_as_flag_reranker_and_cross_encoder_run_it(remote: Path) -> None:
    srv = RerankServer(test_config(remote, trust_remote_code=True, tokenize_workers=1))
    try:
        await srv.start()
        engine = srv.service.models[srv.config.default_model].engine
        assert type(engine.tokenizer).__name__ == "TinyRemoteTokenizer"  # pickled to the worker, found there too
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            resp = await pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(query=QUERY, candidates=SENTENCES))
    finally:
        await srv.stop(0)
    pairs = [[QUERY, s] for s in SENTENCES]
    expected = FlagReranker(str(remote), devices=["cpu"], use_fp16=False, trust_remote_code=True).compute_score(pairs)
    assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)
    ce = CrossEncoder(str(remote), device="cpu", trust_remote_code=True)
    assert type(ce.model).__name__ == "TinyRemoteForSequenceClassification"
    # Pairs that round-trip through the tokenizer alike in both (all of these), raw logits as the config asks.
    assert list(resp.scores) == pytest.approx(
        [float(s) for s in ce.predict([tuple(p) for p in pairs])], **FP32_REORDERED
    )
    # The shipped code ran: transformers' own BERT class on the same weights gives the opposite scores.
    builtin = BertForSequenceClassification.from_pretrained(str(remote)).eval()
    tok = ce.tokenizer
    with torch.no_grad():
        plain = [builtin(**tok(q, p, return_tensors="pt")).logits.item() for q, p in pairs]
    assert list(resp.scores) == pytest.approx([-x for x in plain], **FP32_REORDERED)
    assert max(abs(x) for x in plain) > 0.1


def test_the_revision_covers_the_shipped_code(remote: Path, tmp_path: Path) -> None:
    """A reload (SIGHUP, --watch-models) notices changed code, as it notices changed weights."""
    import shutil

    path = Path(shutil.copytree(remote, tmp_path / "copy"))
    before = revision(str(path))
    (path / "modeling_tiny.py").write_text(MODELING.replace("-out.logits", "2 * out.logits"))
    assert revision(str(path)) != before
