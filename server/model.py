"""Loading a FlagEmbedding cross-encoder, choosing device and dtype, and scoring batches of pairs."""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from FlagEmbedding import FlagReranker
from FlagEmbedding.utils.tokenizer_compat import pad_with_compat, prepare_for_model_compat

from server.config import Config

log = logging.getLogger(__name__)

# Hub look-ups retry for about 30 s before failing; we probe once, briefly, instead.
_HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized (query, passage) pair, exactly as FlagReranker builds it."""

    input_ids: list[int]
    extra: dict[str, list[int]]  # attention_mask, token_type_ids, ... as the tokenizer returns them

    def __len__(self) -> int:
        return len(self.input_ids)


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
        f"To run offline, download the model once (e.g. `git clone https://huggingface.co/{model}` "
        "with git-lfs, or `huggingface-cli download` on a connected machine) and start the server with "
        "--model /path/to/that/directory (or RERANKER_MODEL=/path/to/that/directory)."
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


def _check_is_cross_encoder(path: str) -> None:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return  # a hub id: transformers reports what is wrong
    with open(config_file, encoding="utf-8") as fh:
        cfg = json.load(fh)
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or cfg.get("num_labels", 1) != 1:
        raise ModelLoadError(
            f"{path} is not a cross-encoder reranker (architectures={archs}): expected a "
            "*ForSequenceClassification model with one label, such as BAAI/bge-reranker-base"
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

    def __init__(self, config: Config) -> None:
        self.name = config.model
        self.device = pick_device(config.device)
        on_cuda = self.device.startswith("cuda")
        self.fp16 = on_cuda if config.fp16 is None else (config.fp16 and on_cuda)
        if config.fp16 and not on_cuda:
            log.warning("fp16 is not used on CPU; running in fp32")
        self.dtype = "float16" if self.fp16 else "float32"
        self.max_length = config.max_length
        if not on_cuda:
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        path = resolve_model_path(config.model)
        _check_is_cross_encoder(path)
        _quiet_progress_bars()
        try:
            # devices pinned to one: FlagReranker would otherwise start a multi-GPU process pool.
            self.flag = FlagReranker(
                path,
                use_fp16=self.fp16,
                devices=[self.device],
                batch_size=config.batch_size,
                max_length=config.max_length,
            )
        except OSError as exc:
            raise ModelLoadError(
                f"could not load model {config.model!r}: {exc}. {_offline_help(config.model)}"
            ) from None
        except Exception as exc:  # a checkpoint FlagReranker cannot use
            raise ModelLoadError(f"could not load model {config.model!r} as a reranker: {exc}") from None
        limit = _model_token_limit(self.flag)
        if config.max_length > limit:
            raise ModelLoadError(f"--max-length {config.max_length} is above the model's limit of {limit} tokens")
        self.tokenizer = self.flag.tokenizer
        self.model = self.flag.model
        if self.fp16:
            self.model.half()
        self.model.to(self.device)
        self.model.eval()

    def encode(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> list[Encoded]:
        """Tokenize pairs as FlagReranker.compute_score does (query to 3/4 of max_length, passage truncated)."""
        max_length = max_length or self.max_length
        query_max = self.flag.query_max_length or max_length * 3 // 4
        pairs = self.flag.get_detailed_inputs([list(p) for p in pairs])
        queries = self.tokenizer(
            [p[0] for p in pairs], add_special_tokens=False, max_length=query_max, truncation=True
        )["input_ids"]
        passages = self.tokenizer(
            [p[1] for p in pairs], add_special_tokens=False, max_length=max_length, truncation=True
        )["input_ids"]
        out = []
        for q, d in zip(queries, passages, strict=True):
            try:
                item = prepare_for_model_compat(
                    self.tokenizer, q, d, truncation="only_second", max_length=max_length, padding=False
                )
            except Exception:
                # The decode/re-encode round trip can lengthen the query past max_length, where cutting
                # the passage alone is not enough (FlagReranker itself raises); cut both instead.
                item = prepare_for_model_compat(
                    self.tokenizer, q, d, truncation="longest_first", max_length=max_length, padding=False
                )
            ids = list(item["input_ids"])
            out.append(Encoded(ids, {k: list(v) for k, v in item.items() if k != "input_ids"}))
        return out

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw logits for one padded batch."""
        features = [{"input_ids": e.input_ids, **e.extra} for e in batch]
        inputs = pad_with_compat(self.tokenizer, features, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**inputs, return_dict=True).logits.view(-1).float()
        return logits.cpu().tolist()

    def score(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> list[float]:
        """Raw logits for pairs, in input order, in one batch (for tools and tests)."""
        return self.forward(self.encode(pairs, max_length))

    def warm_up(self) -> None:
        """One forward pass so the first caller does not pay for lazy initialisation."""
        self.score([("warm up", "a short passage to warm up the model")])
