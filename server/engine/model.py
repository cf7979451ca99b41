"""Loading a FlagEmbedding cross-encoder, choosing device and dtype, and scoring batches of pairs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from FlagEmbedding import FlagReranker
from FlagEmbedding.utils.tokenizer_compat import pad_with_compat

from server.chunking import Splitter
from server.config import Config
from server.engine import drift, precision
from server.engine.launch import Arrays, Collect, Launcher
from server.engine.remote_code import remote_code_refusal
from server.tokenize.exact import Encoded, Instructions, PairEncoder, TokenizerCopies
from server.tokenize.options import Options, refusal

__all__ = ["Encoded", "TokenizerCopies"]  # their home is server.tokenize.exact; tests and tools import them here

log = logging.getLogger(__name__)

# Hub look-ups retry for about 30 s before failing; we probe once, briefly, instead.
_HUB_PROBE_TIMEOUT_S = 3.0


# CPU budgets: sized for a 2-core machine, where a batch of 32 already keeps both cores busy.
CPU_BATCH_SIZE = 32
CPU_BATCH_TOKENS = 16384
# CUDA budgets: the most a batch may hold however much memory is free (past it latency grows, throughput not),
# and the share of free memory that a batch's activations may take (the rest: other models, fragmentation).
CUDA_MAX_BATCH_SIZE = 256
CUDA_MAX_BATCH_TOKENS = 256 * 512
CUDA_MEMORY_SHARE = 0.3


@dataclass(frozen=True)
class Batching:
    """Pair and token budgets of one forward pass, and where they came from (for the startup line)."""

    batch_size: int
    max_batch_tokens: int
    source: str


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


def pick_device(requested: str) -> str:
    """auto -> cuda:0 when CUDA is present, else cpu; an explicit device must exist."""
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {requested} was asked for, but CUDA is not available on this machine")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return f"cuda:{index}"
    return requested


def _offline_help(model: str) -> str:
    return (
        f"To run offline, download the model once on a connected machine (`hf download {model} --local-dir "
        f"./models/{model.rsplit('/', 1)[-1]}`, the command huggingface-hub installs, or `git clone "
        f"https://huggingface.co/{model}` with git-lfs) and start the server with --model "
        "/path/to/that/directory (or RERANKER_MODEL=/path/to/that/directory). To try the service "
        "without any download, build a random-weight model (its scores mean nothing): "
        "`python -m tools.make_model ./models/tiny --shape tiny`, then `python -m server --model ./models/tiny`."
    )


def resolve_model_path(model: str) -> str:
    """A local directory for `model`, or the hub id when the hub is reachable; fails fast otherwise."""
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            # `docker run -v` with a host path that does not exist mounts an empty directory.
            raise ModelLoadError(
                f"model directory {model!r} has no config.json. Pass --model with a directory that holds "
                "config.json, the tokenizer files and the weights (in a container: mount it there)."
            )
        return expanded
    if os.path.isabs(expanded) or model.startswith((".", "~")) or os.path.exists(expanded) or model.count("/") > 1:
        raise ModelLoadError(
            f"model directory {model!r} does not exist. Pass --model with a directory that holds "
            "config.json, the tokenizer files and the weights (in a container: mount it there)."
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, local_files_only=True)  # already in the local Hugging Face cache
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ModelLoadError(
            f"model {model!r} is not a local directory and the Hugging Face hub ({host}) cannot be reached "
            f"({exc}). {_offline_help(model)}"
        ) from None
    return model


# What decides a model's scores: its config, weights, tokenizer and any code it ships; hashed into its revision.
_REVISION_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".py")


def model_files(path: str) -> list[str]:
    """The files of a model directory that decide its scores, sorted (empty for a hub id)."""
    if not os.path.isdir(path):
        return []
    return sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(_REVISION_SUFFIXES) and not f.startswith(".")
    )


def files_signature(path: str) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times: a cheap look for a changed directory before hashing it."""
    out = []
    for f in model_files(path):
        try:
            st = os.stat(f)
        except OSError:  # removed while we looked: changed
            continue
        out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(out)


def revision(path: str) -> str:
    """A short hash of the model's config, weights and tokenizer files (their bytes, not their dates)."""
    digest = hashlib.blake2b(digest_size=6)
    for f in model_files(path):
        digest.update(os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def own_weights(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer into the process's own memory. Loading maps model.safetensors into memory
    (on CPU the tensors stay views of the file): a file copied over it in place would change the scores of the
    running model, or crash it (SIGBUS) when the file shrinks. Tied weights stay tied (one copy per tensor)."""
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or id(t) in done:
                        continue
                    done.add(id(t))
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.clone()
                    else:
                        table[name] = t.clone()
                        done.add(id(table[name]))


def place(model: torch.nn.Module, device: str, fp16: bool, snapshot: Snapshot) -> int:
    """Cast and move loaded weights to `device`, make them the process's own (on CUDA the copy to the device does
    that), refuse them if their files changed meanwhile, and set eval mode; returns the parameter count."""
    if fp16:
        model.half()
    model.to(device)
    if not device.startswith("cuda"):
        own_weights(model)
    snapshot.check()
    model.eval()
    return sum(p.numel() for p in model.parameters())


class Snapshot:
    """The model files' signature when loading began; `check()` after loading refuses weights read while the files
    were changing (a copy in progress): the old model keeps serving, the next reload tries again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.before = files_signature(path)

    def check(self) -> None:
        if files_signature(self.path) != self.before:
            raise ModelLoadError(
                f"the files of {self.path} changed while they were being loaded; load again once they are complete "
                "(copy a new model beside the old one and rename it into place, then SIGHUP)"
            )


def read_model_config(path: str) -> dict[str, Any] | None:
    """The config.json of a local model directory; None for a hub id."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as fh:
        return json.load(fh)


def config_kind(cfg: dict[str, Any]) -> str | None:
    """From a config.json's architectures: cross-encoder, layerwise, lightweight, or causal (a *ForCausalLM whose
    recipe the config alone cannot tell: server.engine.llm_model.model_kind looks further); None: no reranker."""
    archs = cfg.get("architectures") or []
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {0: ""})
    if any("LayerWise" in a for a in archs):  # BAAI/bge-reranker-v2-minicpm-layerwise
        return "layerwise"
    if any("CostWise" in a for a in archs):  # BAAI/bge-reranker-v2.5-gemma2-lightweight
        return "lightweight"
    if any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1:
        return "cross-encoder"
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal"
    return None


def not_a_reranker(path: str, cfg: dict[str, Any]) -> ModelLoadError:
    archs = cfg.get("architectures") or []
    return ModelLoadError(
        f"{path} is not a reranker this server can serve (architectures={archs}): expected a "
        "*ForSequenceClassification model with one label, such as BAAI/bge-reranker-base, or a decoder-only reranker "
        "(README: the families table); --model-type overrides the detection"
    )


def _check_is_cross_encoder(path: str) -> None:
    cfg = read_model_config(path)
    if cfg is None:
        return  # a hub id: transformers reports what is wrong
    kind = config_kind(cfg)
    if kind is None:
        raise not_a_reranker(path, cfg)
    if kind != "cross-encoder":
        raise ModelLoadError(
            f"{path} is a decoder-only model (architectures={cfg.get('architectures')}), not a cross-encoder: "
            "serve it with --model-type auto or the --model-type of its family (README: the families table)"
        )


def _quiet_progress_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def _model_token_limit(flag: FlagReranker) -> int:
    """The longest input the model takes: the tokenizer's limit, else the position table's size."""
    tokenizer_max = getattr(flag.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and tokenizer_max < 10**6:
        return tokenizer_max
    return int(getattr(flag.model.config, "max_position_embeddings", 512))


class RerankerModel:
    """A FlagEmbedding reranker on one device. score() keeps FlagReranker's tokenization and scores."""

    family = "cross-encoder"
    default_instruction = ""  # a cross-encoder takes no instruction
    options = frozenset({"query_max_length"})  # what a request may set (server.tokenize.options)

    def __init__(self, config: Config, model: str | None = None, name: str | None = None) -> None:
        """Load `model` (a hub id or directory; default: the config's default model) under `name`."""
        default_name, default_model = config.models[0]
        model = model or default_model
        self.name = name or default_name
        self.device = pick_device(config.device)
        on_cuda = self.device.startswith("cuda")
        try:
            self.mode = precision.resolve(config.dtype_of(self.name), self.device, config.fp16)
        except precision.PrecisionError as exc:
            raise ModelLoadError(str(exc)) from None
        self.fp16 = self.mode == "fp16"
        if config.fp16 and not on_cuda:
            log.warning("fp16 is not used on CPU; running in fp32")
        self.dtype = precision.NAMES[self.mode]
        self.backend = "torch"  # or onnxruntime (int8)
        self.drift: drift.Drift | None = None  # an approximate mode's, measured at load
        self.conversion = ""  # int8: where its converted model is kept, and its size
        self.max_length = config.max_length
        if not on_cuda:
            torch.set_num_threads(config.torch_threads)
        self.path = path = resolve_model_path(model)
        snapshot = Snapshot(path)
        self.revision = revision(path)
        if config.model_type != "cross-encoder":  # an explicit --model-type cross-encoder skips the detection
            _check_is_cross_encoder(path)
        if refusal := remote_code_refusal(path, config.trust_remote_code):
            raise ModelLoadError(refusal)
        _quiet_progress_bars()
        try:
            # devices pinned to one: FlagReranker would otherwise start a multi-GPU process pool.
            self.flag = FlagReranker(
                path,
                use_fp16=self.fp16,
                devices=[self.device],
                batch_size=config.batch_size or CPU_BATCH_SIZE,
                max_length=config.max_length,
                trust_remote_code=config.trust_remote_code,
            )
        except OSError as exc:
            raise ModelLoadError(f"could not load model {model!r}: {exc}. {_offline_help(model)}") from None
        except Exception as exc:  # a checkpoint FlagReranker cannot use
            raise ModelLoadError(f"could not load model {model!r} as a reranker: {exc}") from None
        limit = _model_token_limit(self.flag)
        if config.max_length > limit:
            raise ModelLoadError(f"--max-length {config.max_length} is above the model's limit of {limit} tokens")
        self.tokenizer = self.flag.tokenizer
        self.model: Any = self.flag.model
        if self.mode in ("bf16", "int8"):  # CPU: the fp32 weights stay views of the file until cast or converted
            self.model.eval()  # (a copy made and freed at once would leave the heap holding its size)
            self.parameters = sum(p.numel() for p in self.model.parameters())
        else:  # an approximate mode on CUDA starts from fp32 too: its drift is measured against that
            self.parameters = place(self.model, self.device, False, snapshot)
        self._cuda = on_cuda
        self._pad_id = self.tokenizer.pad_token_id
        self._pad_type_id = getattr(self.tokenizer, "pad_token_type_id", 0)
        self.encoder = PairEncoder(self.tokenizer, Instructions.of(self.flag), config.max_length)
        self.max_width = config.max_length  # the longest input a pair can have
        self.launcher: Any = Launcher(self.model, self.device, self._logits, causal=False, buckets=None)
        if self.mode != "fp32":
            self._approximate(config)
            snapshot.check()  # the weights were read while casting or converting: not while they changed

    def _approximate(self, config: Config) -> None:
        """Switch to bf16, fp16 or int8, scoring the drift sample before and after; refuse past the drift bounds."""
        sample = self.encode(drift.sample_pairs(self.tokenizer, self.max_length))
        reference = drift.score_sample(sample, self.forward)
        if self.mode == "int8":
            self._to_int8(config, sample)
        else:  # cast weights: measured faster than autocast on CPU, and half the memory (README, "Precision")
            self.model.to(precision.TORCH_DTYPES[self.mode])
            self.launcher = Launcher(self.model, self.device, self._logits, causal=False, buckets=None)
        self.drift = drift.compare(reference, drift.score_sample(sample, self.forward))
        try:
            drift.check_bound(self.drift, self.mode, config.max_drift, config.min_rank_correlation)
        except drift.DriftTooLarge as exc:
            raise ModelLoadError(f"model {self.name}: {exc}") from None

    def _to_int8(self, config: Config, sample: Sequence[Encoded]) -> None:
        """Run an int8 ONNX Runtime copy of the model (converted, or found in the cache), and free the torch one."""
        from server.engine import onnx_int8

        by_length = sorted(sample, key=len)
        pair = [by_length[0], by_length[len(by_length) // 2]]  # of two lengths: the export sees a padded batch
        key = self.revision if os.path.isdir(self.path) else f"{self.revision}-{self.path.replace('/', '--')}"
        try:
            example = self._arrays(pair, 2, len(pair[1]))
            path, cached = onnx_int8.cached_model(self.path, key, example, config.quantize_cache)
            self.launcher = onnx_int8.OnnxLauncher(path, config.torch_threads)
        except precision.PrecisionError as exc:
            raise ModelLoadError(str(exc)) from None
        self.backend = "onnxruntime"
        how = "cached" if cached else "converted now"
        self.conversion = f"{path.parent} ({onnx_int8.size_mib(path):.0f} MiB, {how})"
        self.flag.model = self.model = None  # the int8 copy serves: the fp32 weights' memory goes back

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs, return_dict=True).logits.view(-1).float()

    def refuse(self, o: Options) -> str | None:
        """Why this model cannot honour a request's options (None: it can)."""
        return refusal(self.name, self.family, o, self.options)

    def splitter(self, o: Options, tokenizer: Any) -> Splitter:
        """What cuts a request's long passages into windows that each fit with its query (long_documents=CHUNK)."""
        return Splitter(self.flag, o.max_length or self.max_length, tokenizer, o.query_max_length)

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Encoded]:
        """The pairs tokenized exactly as compute_score does (server.tokenize.exact), in this thread; `options`: the
        request's (or a bare max_length)."""
        return self.encoder.encode(pairs, options)

    def thread_tokenizer(self) -> Any:
        """This thread's own copy of the tokenizer (see TokenizerCopies)."""
        return self.encoder.thread_tokenizer()

    def copy_tokenizer(self, threads: int) -> None:
        """Make the copies of the tokenizer that `threads` tokenizing threads will use."""
        self.encoder.copy_tokenizer(threads)

    def _arrays(self, batch: Sequence[Encoded], rows: int, width: int) -> Arrays:
        """Pad a batch as `tokenizer.pad` does (same values, same side), in numpy, to `rows` x `width`; a row past
        the batch is one attended pad token (its score is dropped)."""
        keys = ["input_ids", *batch[0].extra]
        fill = {"input_ids": self._pad_id, "attention_mask": 0, "token_type_ids": self._pad_type_id}
        if self._pad_id is None or "attention_mask" not in keys or any(k not in fill for k in keys):
            # an input we do not know how to pad as tokenizer.pad would: let it do the padding, exact width
            features = [{k: list(v) for k, v in {"input_ids": e.input_ids, **e.extra}.items()} for e in batch]
            return {k: t.numpy() for k, t in pad_with_compat(self.tokenizer, features, padding=True).items()}
        arrays = {k: np.full((rows, width), fill[k], dtype=np.int64) for k in keys}
        left = self.tokenizer.padding_side == "left"
        for row, e in enumerate(batch):
            cols = slice(width - len(e), width) if left else slice(0, len(e))
            arrays["input_ids"][row, cols] = e.input_ids
            for k, values in e.extra.items():
                arrays[k][row, cols] = values
        arrays["attention_mask"][len(batch) :, -1 if left else 0] = 1
        return arrays

    def _collate(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """The batch padded to its longest pair, as tensors (what tokenizer.pad returns)."""
        arrays = self._arrays(batch, len(batch), max(len(e) for e in batch))
        return {k: torch.from_numpy(a) for k, a in arrays.items()}

    def launch(self, batch: Sequence[Encoded]) -> Collect:
        """Start the forward pass of one batch; the returned function waits for its raw logits (server.engine.launch:
        on CUDA nothing here waits for the device, and the batch is padded to its shape bucket)."""
        rows, width = self.launcher.shape(len(batch), max(len(e) for e in batch))
        return self.launcher.launch(self._arrays(batch, rows, width), len(batch))

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw logits for one padded batch, waiting for them."""
        return self.launch(batch)()

    def score(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[float]:
        """Raw logits for pairs, in input order, in one batch (for tools and tests)."""
        return self.forward(self.encode(pairs, options))

    def batching(self, config: Config) -> Batching:
        """The flags' budgets where given (non-zero), else ones that fit this device."""
        if config.batch_size and config.max_batch_tokens:
            return Batching(config.batch_size, config.max_batch_tokens, "flags")
        if self._cuda:
            size, tokens, how = self._cuda_budget(config.max_length)
        else:
            size, tokens, how = CPU_BATCH_SIZE, CPU_BATCH_TOKENS, "cpu defaults"
        return Batching(config.batch_size or size, config.max_batch_tokens or tokens, how)

    def _cuda_budget(self, max_length: int) -> tuple[int, int, str]:
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        c = self.model.config
        hidden = int(getattr(c, "hidden_size", 1024))
        heads = int(getattr(c, "num_attention_heads", 16))
        inter = int(getattr(c, "intermediate_size", 4 * hidden))
        # Live activations per token inside one layer: residual, Q, K, V, attention output, the FFN's inner
        # width, and one row of attention scores per head; doubled for the allocator's slack.
        per_token = 2 * (5 * hidden + inter + heads * max_length) * (2 if self.fp16 else 4)
        fit = int(free * CUDA_MEMORY_SHARE / per_token)
        tokens = max(max_length, min(CUDA_MAX_BATCH_TOKENS, fit))
        size = max(CPU_BATCH_SIZE, min(CUDA_MAX_BATCH_SIZE, tokens // 256))
        return size, tokens, f"cuda: {fit} tokens fit in {CUDA_MEMORY_SHARE:.0%} of {free / 2**30:.1f} GiB free"

    def warm_up(self, pairs: int = 1) -> None:
        """Forward passes so the first callers do not pay for lazy initialisation (allocator growth, kernels chosen
        for a shape): one pair, then a batch of `pairs` pairs of 64 tokens."""
        self.score([("warm up", "a short passage to warm up the model")])
        if pairs > 1:
            passage = " ".join(["a passage of many words to warm up the model"] * 16)
            self.score([("warm up", passage)] * pairs, min(64, self.max_length))
