"""Decoder-only rerankers: FlagEmbedding's FlagLLMReranker and the layer-wise MiniCPM one, behind the engine interface.

The score of a pair is the model's "Yes" logit after the prompt (FlagLLMReranker), or the layer-wise head's output at
the cutoff layer (LayerWiseFlagLLMReranker), at the last token. Pairs are tokenized exactly as the class's
`compute_score_single_gpu` does; a batch is padded on the left with position ids counted from the attention mask, so
each pair sits at positions 0..n-1 whatever its batch-mates. compute_score's own left padding shifts them, which under
rotary embeddings moves its scores by float rounding only (up to 1e-4 on a tiny model with wide random weights).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from FlagEmbedding import FlagLLMReranker, LayerWiseFlagLLMReranker
from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import LayerWiseMiniCPMConfig
from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
    LayerWiseMiniCPMForCausalLM,
)

from server.config import MODEL_TYPES, Config
from server.engine.launch import Arrays, Collect, Launcher
from server.engine.model import (
    CPU_BATCH_SIZE,
    ModelLoadError,
    RerankerModel,
    Snapshot,
    _offline_help,
    _quiet_progress_bars,
    config_kind,
    not_a_reranker,
    pick_device,
    place,
    read_model_config,
    revision,
)
from server.engine.precision import PrecisionError, resolve
from server.tokenize.exact import Instructions
from server.tokenize.options import Options, refusal
from server.tokenize.prompted import Prompted, PromptEncoder

log = logging.getLogger(__name__)

# FlagEmbedding's default prompt (decoder_only/base.py); the class's `prompt` argument overrides it.
DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing "
    "a prediction of either 'Yes' or 'No'."
)
PAD_MULTIPLE = 8  # the Collater's pad_to_multiple_of
_COMPAT_LOCK = threading.Lock()  # layerwise_compat patches classes: one load at a time


QWEN3_TOKENS = ("yes", "no", "<|im_start|>", "<|im_end|>", "<think>", "</think>")  # Qwen3-Reranker's recipe reads
# mxbai-rerank-base-v2, -large-v2 and their copies: its config and tokenizer are any Qwen2's, so only the name tells
MXBAI_V2_NAME = re.compile(r"mxbai-rerank[^\s/]*v2")


def model_kind(path: str, override: str = "auto", name: str = "") -> str:
    """The family whose recipe scores the model: `override` unless it is auto, else what the config, the tokenizer
    and the model's name (`name`: the --model given, a hub id or a directory) tell for certain; never a guess."""
    if override != "auto":
        if override not in MODEL_TYPES:
            raise ModelLoadError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {override!r}")
        return override
    cfg = read_model_config(path)
    if cfg is None:  # a hub id: its config.json alone
        cfg = _hub_config(path)
    kind = config_kind(cfg)
    if kind is None:
        raise not_a_reranker(path, cfg)
    if kind == "causal":
        return _causal_family(path, cfg, f"{name} {path}".lower())
    return kind


def _causal_family(path: str, cfg: dict[str, Any], names: str) -> str:
    """A *ForCausalLM's family: Qwen3-Reranker (a Qwen3 LM with the template's tokens), mxbai-rerank v2 or a BAAI
    bge-reranker (by name), else refused with one line naming --model-type."""
    archs = cfg.get("architectures") or []
    if "Qwen3ForCausalLM" in archs and ("qwen3-reranker" in names or _has_tokens(path, QWEN3_TOKENS)):
        return "qwen3-reranker"
    if MXBAI_V2_NAME.search(names):
        return "mxbai-rerank-v2"
    if "bge-reranker" in names:  # BAAI/bge-reranker-v2-gemma and its fine-tunes, by name
        return "llm"
    raise ModelLoadError(
        f"{path} is a causal LM (architectures={archs}) whose reranking recipe cannot be told for certain from its "
        "config, tokenizer or name; scoring it with another family's prompt would give meaningless scores. Pass "
        "--model-type llm (FlagLLMReranker: bge-reranker-v2-gemma's prompt and 'Yes' logit) or --model-type "
        "qwen3-reranker (Qwen3-Reranker's template, yes/no) or --model-type mxbai-rerank-v2 (the mxbai-rerank "
        f"package's prompt, 1/0); all values: {', '.join(MODEL_TYPES)}"
    )


def _has_tokens(path: str, tokens: Sequence[str]) -> bool:
    """True when the model's tokenizer has each of `tokens` as one token of its own."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # no tokenizer we can read: not the family we look for
        return False
    vocab = tok.get_vocab()
    return all(t in vocab for t in tokens)


def _hub_config(model: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(model, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except Exception as exc:  # offline, no such repo, no access
        raise ModelLoadError(f"could not read config.json of model {model!r}: {exc}. {_offline_help(model)}") from None


@contextlib.contextmanager
def layerwise_compat() -> Iterator[None]:
    """Let FlagEmbedding's MiniCPM layer-wise model build under transformers 5 (restored on exit).

    transformers 5 returns its standardized `rope_parameters` for `config.rope_scaling`, so a config without scaling
    reads as scaled and `_init_rope` fails on the missing "type" key; and it expects `_tied_weights_keys` to be a
    dict (the model's is a list; its per-layer heads are never tied to the embeddings anyway).
    """
    with _COMPAT_LOCK:
        yield from _patched_minicpm()


def _patched_minicpm() -> Iterator[None]:
    saved_rope = LayerWiseMiniCPMConfig.__dict__.get("rope_scaling")
    saved_tied = LayerWiseMiniCPMForCausalLM.__dict__.get("_tied_weights_keys")
    base = LayerWiseMiniCPMConfig.rope_scaling

    def legacy_rope_scaling(self: LayerWiseMiniCPMConfig) -> dict[str, Any] | None:
        params = getattr(self, "rope_parameters", None)
        return params if params and "type" in params else None  # only a legacy {"type", "factor"} is scaling

    if isinstance(base, property):
        LayerWiseMiniCPMConfig.rope_scaling = property(legacy_rope_scaling, base.fset)  # type: ignore[method-assign, assignment]
    LayerWiseMiniCPMForCausalLM._tied_weights_keys = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for cls, name, saved in (
            (LayerWiseMiniCPMConfig, "rope_scaling", saved_rope),
            (LayerWiseMiniCPMForCausalLM, "_tied_weights_keys", saved_tied),
        ):
            if saved is None:
                with contextlib.suppress(AttributeError):
                    delattr(cls, name)
            else:
                setattr(cls, name, saved)


def _repair_layerwise(model: torch.nn.Module) -> None:
    """What transformers 5's loading leaves undone in the MiniCPM model, done as its __init__ would.

    Its rotary tables are non-persistent buffers, which loading (on the meta device) leaves uninitialised: rebuild
    them. Its forward still calls the removed `DynamicCache.from_legacy_cache` when the cache is on: a reranker
    never uses the cache.
    """
    for module in model.modules():
        if hasattr(module, "_set_cos_sin_cache") and hasattr(module, "inv_freq"):
            steps = torch.arange(0, module.dim, 2, device=module.inv_freq.device).float()
            module.inv_freq = 1.0 / (module.base ** (steps / module.dim))
            module._set_cos_sin_cache(
                seq_len=module.max_position_embeddings, device=module.inv_freq.device, dtype=torch.float32
            )
    model.config.use_cache = False


def load_flag_reranker(path: str, kind: str, **kwargs: Any) -> FlagLLMReranker | LayerWiseFlagLLMReranker:
    """FlagEmbedding's class for `kind` ("llm" or "layerwise"), loaded so that it scores correctly here."""
    if kind == "llm":
        return FlagLLMReranker(path, **kwargs)
    with layerwise_compat(), warnings.catch_warnings():
        # "use_fp16 is set to True": the class's own choice, made again (and logged) by LLMRerankerModel
        warnings.filterwarnings("ignore", message="Due to model constraints", category=UserWarning)
        flag = LayerWiseFlagLLMReranker(path, **kwargs)
    if not isinstance(flag.model, LayerWiseMiniCPMForCausalLM):  # the class falls back to AutoModelForCausalLM
        raise ModelLoadError(f"{path} did not load as FlagEmbedding's LayerWiseMiniCPMForCausalLM")
    _repair_layerwise(flag.model)
    return flag


@contextlib.contextmanager
def load_errors(path: str, kind: str) -> Iterator[None]:
    """A loading failure as a ModelLoadError that says what to do: offline help for a missing file, else the kind."""
    try:
        yield
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"could not load model {path!r}: {exc}. {_offline_help(path)}") from None
    except Exception as exc:  # a checkpoint the class cannot use
        raise ModelLoadError(f"could not load model {path!r} as a {kind} reranker: {exc}") from None


def _use_fp16(config: Config, kind: str, on_cuda: bool) -> bool:
    """fp16 on CUDA unless --no-fp16 (the layer-wise class insists on it), never on CPU."""
    if config.fp16 and not on_cuda:
        log.warning("fp16 is not used on CPU; running in fp32")
    if kind == "layerwise" and on_cuda:
        if config.fp16 is False:
            log.warning("layer-wise rerankers run in fp16 on CUDA (as FlagEmbedding's class does); --no-fp16 ignored")
        return True
    return on_cuda if config.fp16 is None else (config.fp16 and on_cuda)


class LLMRerankerModel:
    """A FlagEmbedding decoder-only reranker on one device; scores equal the class's compute_score."""

    pad_multiple = PAD_MULTIPLE

    # The cross-encoder's: they use only encode/launch, the device, the dtype and the model config's shape.
    batching = RerankerModel.batching
    _cuda_budget = RerankerModel._cuda_budget
    forward = RerankerModel.forward
    score = RerankerModel.score
    warm_up = RerankerModel.warm_up
    thread_tokenizer = RerankerModel.thread_tokenizer
    copy_tokenizer = RerankerModel.copy_tokenizer
    encode = RerankerModel.encode
    splitter = RerankerModel.splitter

    family = "bge-llm"
    default_instruction = DEFAULT_PROMPT
    options = frozenset({"instruction", "query_max_length"})  # what a request may set (server.tokenize.options)

    def __init__(self, config: Config, path: str, kind: str, name: str | None = None) -> None:
        if kind not in ("llm", "layerwise"):
            raise ValueError(f"kind must be llm or layerwise, got {kind!r}")
        snapshot = self._begin(config, path, kind, name)
        self.flag = self._load(config, path, kind)
        self.tokenizer = self.flag.tokenizer
        self.model = self.flag.model
        self._check_limits(config, path)
        self.parameters = place(self.model, self.device, self.fp16, snapshot)
        tok = self.tokenizer
        prompt = DEFAULT_PROMPT if self.flag.prompt is None else self.flag.prompt
        self.default_instruction = prompt
        bos, pad = tok.bos_token_id, tok.pad_token_id
        # compute_score: the layer-wise class always starts with bos, the other one when bos is not the pad token.
        with_bos = kind == "layerwise" or (bos is not None and bos != pad)
        layered = kind == "layerwise"
        self.encoder = PromptEncoder(tok, Instructions.of(self.flag), config.max_length, prompt, with_bos, layered)
        self._pad_id = pad if pad is not None else 0  # padded positions are masked: any id will do
        enc = self.encoder
        # the longest input: query and passage cut to max_length plus separators and prompt, twice (compute_score's)
        self.max_width = config.max_length + 2 * (len(enc.sep) + len(enc.prompt)) + len(enc.bos)
        self.launcher = Launcher(self.model, self.device, self._scores, causal=True, buckets=None)
        if kind == "llm":
            self._yes = self.flag.yes_loc
            takes_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            self._last_only = {"logits_to_keep": 1} if takes_keep else {}  # no vocabulary-wide logits per token
        else:
            self.family = "bge-layerwise"
            self.options = self.options | {"cutoff_layers"}
            self._cutoff = [config.cutoff_layer] if config.cutoff_layer else [self.model.config.num_hidden_layers]
            self._layers = self._cutoff

    def _begin(self, config: Config, path: str, kind: str, name: str | None) -> Snapshot:
        """What every decoder-only family sets first: name, path, revision, device, dtype, threads."""
        self.name = name or config.default_model
        self.path = path
        snapshot = Snapshot(path)
        self.revision = revision(path)
        self.kind = kind
        self.device = pick_device(config.device)
        self._cuda = on_cuda = self.device.startswith("cuda")
        self.fp16 = _use_fp16(config, kind, on_cuda)
        self._check_dtype(config.dtype_of(self.name), kind)
        self.dtype = "float16" if self.fp16 else "float32"
        self.max_length = config.max_length
        if not on_cuda:
            torch.set_num_threads(config.torch_threads)
        return snapshot

    def _check_dtype(self, requested: str, kind: str) -> None:
        """--dtype for a decoder-only family: auto, fp32 (fp16 off, where the class allows it) or fp16 on CUDA; the
        approximate CPU modes (bf16, int8) exist for cross-encoders only, so they are refused, never ignored."""
        try:
            resolved = resolve(requested, self.device, None if requested == "auto" else requested == "fp16")
        except PrecisionError as exc:
            raise ModelLoadError(str(exc)) from None
        if resolved in ("bf16", "int8"):
            raise ModelLoadError(
                f"--dtype {requested} for model {self.name!r}: the decoder-only rerankers ({kind}) run fp32 on CPU and "
                "fp16 on CUDA here; bf16 and int8 are cross-encoder modes"
            )
        if requested == "fp32" and kind in ("llm", "qwen3-reranker", "mxbai-rerank-v2"):
            self.fp16 = False
        elif requested == "fp16":
            self.fp16 = self._cuda

    def refuse(self, o: Options) -> str | None:
        """Why this model cannot honour a request's options (None: it can); see server.tokenize.options."""
        why = refusal(self.name, self.family, o, self.options)
        if why is None and o.cutoff_layers and self.kind == "layerwise":
            return self._refuse_layers(o.cutoff_layers)
        return why

    def _refuse_layers(self, layers: tuple[int, ...]) -> str | None:
        first, last = self.model.config.start_layer, self.model.config.num_hidden_layers
        if len(layers) != 1 or not first <= layers[0] <= last:
            return (
                f"cutoff_layers {list(layers)}: model {self.name!r} scores with one layer's head, "
                f"one of {first}..{last}"
            )
        return None

    def _load(self, config: Config, path: str, kind: str) -> FlagLLMReranker | LayerWiseFlagLLMReranker:
        if config.cutoff_layer and kind != "layerwise":
            log.warning("--cutoff-layer applies to layer-wise rerankers only; ignored for %s", path)
        kwargs: dict[str, Any] = {
            "use_fp16": self.fp16,
            "devices": [self.device],  # one device: the class would otherwise start a multi-GPU process pool
            "batch_size": config.batch_size or CPU_BATCH_SIZE,
            "max_length": config.max_length,
        }
        if kind == "layerwise" and config.cutoff_layer:
            kwargs["cutoff_layers"] = [config.cutoff_layer]
        _quiet_progress_bars()
        with load_errors(path, kind):
            return load_flag_reranker(path, kind, **kwargs)

    def _check_limits(self, config: Config, path: str) -> None:
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        if limit and config.max_length > limit:
            raise ModelLoadError(f"--max-length {config.max_length} is above the model's limit of {limit} tokens")
        if self.kind == "layerwise":
            first, last = self.model.config.start_layer, self.model.config.num_hidden_layers
            if config.cutoff_layer and not first <= config.cutoff_layer <= last:
                raise ModelLoadError(
                    f"--cutoff-layer {config.cutoff_layer} is outside {path}'s scoring layers {first}..{last}"
                )

    def _arrays(self, batch: Sequence[Prompted], rows: int, width: int) -> Arrays:
        """Left-pad to `width` (a multiple of 8, as the Collater); positions count real tokens only, from 0. A row
        past the batch is one attended pad token (its score is dropped)."""
        ids = np.full((rows, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        for row, e in enumerate(batch):
            ids[row, width - len(e) :] = e.input_ids
            mask[row, width - len(e) :] = 1
        mask[len(batch) :, -1] = 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def _collate(self, batch: Sequence[Prompted]) -> dict[str, torch.Tensor]:
        width = -(-max(len(e) for e in batch) // PAD_MULTIPLE) * PAD_MULTIPLE
        return {k: torch.from_numpy(a) for k, a in self._arrays(batch, len(batch), width).items()}

    def _scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last token's "Yes" logit (llm) or the cutoff layer's score (layerwise), one per row, as float32."""
        if self.kind == "llm":
            logits = self.model(**inputs, use_cache=False, **self._last_only).logits
            return logits[:, -1, self._yes].float()
        out = self.model(**inputs, use_cache=False, cutoff_layers=self._layers)
        return out.logits[0][:, -1].float()

    def launch(self, batch: Sequence[Prompted]) -> Collect:
        """Start the forward pass of one batch; the returned function waits for its raw scores (see RerankerModel).
        Every pair of a batch has the same forward settings (the batcher groups by them): the first one's rule."""
        width = -(-max(len(e) for e in batch) // PAD_MULTIPLE) * PAD_MULTIPLE
        rows, width = self.launcher.shape(len(batch), width)
        captured = True
        if self.kind == "layerwise":
            layers = batch[0].forward[0] if batch[0].forward else ()
            self._layers = list(layers) or self._cutoff  # read by _scores on this (the device's) thread
            captured = self._layers == self._cutoff  # CUDA graphs hold the default layer's forward only
        return self.launcher.launch(self._arrays(batch, rows, width), len(batch), captured)
