"""FlagEmbedding's lightweight reranker (bge-reranker-v2.5-gemma2-lightweight, CostWiseGemmaForCausalLM).

Its cost knobs are per request: `cutoff_layers` (the layer whose head scores), `compress_ratio` (1, 2, 4, 8: the
passage's tokens are averaged in groups of that many at `compress_layers`). Pairs are built as the class's
compute_score builds them ([bos] query, sep passage, sep prompt, padded on the right) and the forward is the
model's own, called as compute_score calls it. Settings change the computation, so requests with other settings
never share a batch (Prompted.forward).

FlagEmbedding ships the model's code for transformers 4.46; `lightweight_compat` lets it run under transformers 5:
decoder layers now take the rotary embeddings from their caller and return a tensor, not a tuple; the attention
caps its logits (softcapping), which only the eager attention does; and `_tied_weights_keys` must be a dict.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from FlagEmbedding import LightWeightFlagLLMReranker
from FlagEmbedding.inference.reranker.decoder_only.lightweight import last_logit_pool_lightweight
from FlagEmbedding.inference.reranker.decoder_only.models.gemma_model import CostWiseGemmaForCausalLM

from server.config import Config
from server.engine.launch import Arrays, Collect, Launcher
from server.engine.llm_model import PAD_MULTIPLE, LLMRerankerModel, load_errors
from server.engine.model import CPU_BATCH_SIZE, ModelLoadError, _quiet_progress_bars, place
from server.tokenize.exact import Instructions
from server.tokenize.options import Options, refusal
from server.tokenize.prompted import Prompted, PromptEncoder

# LightweightLLMReranker.compute_score's default prompt, and its class's defaults for the knobs.
DEFAULT_PROMPT = "Predict whether passage B contains an answer to query A."
DEFAULT_COMPRESS_LAYERS = (8,)
COMPRESS_RATIOS = (1, 2, 4, 8)
_LOCK = threading.Lock()  # the compat patches a class: one load at a time


@contextlib.contextmanager
def lightweight_compat() -> Iterator[None]:
    """Let FlagEmbedding's CostWiseGemmaForCausalLM build, load and run under transformers 5 (the class is restored
    on exit; the models built inside keep their repairs)."""
    with _LOCK:
        init, tied = CostWiseGemmaForCausalLM.__init__, CostWiseGemmaForCausalLM.__dict__.get("_tied_weights_keys")

        def repaired_init(self: CostWiseGemmaForCausalLM, config: Any) -> None:
            init(self, config)
            repair(self)

        CostWiseGemmaForCausalLM.__init__ = repaired_init  # type: ignore[method-assign]
        CostWiseGemmaForCausalLM._tied_weights_keys = None  # type: ignore[assignment]
        try:
            yield
        finally:
            CostWiseGemmaForCausalLM.__init__ = init  # type: ignore[method-assign]
            CostWiseGemmaForCausalLM._tied_weights_keys = tied  # type: ignore[assignment]


def repair(model: CostWiseGemmaForCausalLM) -> None:
    """Eager attention (softcapping), and each decoder layer given its rotary embeddings and made to return a tuple,
    as the model's transformers 4 forward expects."""
    model.config._attn_implementation = "eager"
    rotary: list[Any] = []  # built on first use: loading builds the model on the meta device

    def with_rotary(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if kwargs.get("position_embeddings") is None:
            if not rotary:
                from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

                rotary.append(Gemma2RotaryEmbedding(model.config))
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["position_embeddings"] = rotary[0](hidden, kwargs["position_ids"])
        return args, kwargs

    for layer in model.model.layers:
        layer.register_forward_pre_hook(with_rotary, with_kwargs=True)
        layer.register_forward_hook(lambda _m, _a, out: (out,) if isinstance(out, torch.Tensor) else out)


def load_lightweight(path: str, **kwargs: Any) -> LightWeightFlagLLMReranker:
    """FlagEmbedding's LightWeightFlagLLMReranker, loaded so that it scores correctly here (also the tests' oracle)."""
    with lightweight_compat(), warnings.catch_warnings():
        # "use_fp16 is set to True": the class's own default, made again (and logged) by LightweightModel
        warnings.filterwarnings("ignore", message="Due to model constraints", category=UserWarning)
        flag = LightWeightFlagLLMReranker(path, **kwargs)
    if not isinstance(flag.model, CostWiseGemmaForCausalLM):  # the class falls back to AutoModelForCausalLM
        raise ModelLoadError(f"{path} did not load as FlagEmbedding's CostWiseGemmaForCausalLM")
    return flag


class LightweightModel(LLMRerankerModel):
    """bge-reranker-v2.5-gemma2-lightweight on one device; scores equal LightWeightFlagLLMReranker.compute_score's
    called with the same cutoff_layers, compress_ratio, compress_layers and prompt."""

    family = "bge-lightweight"
    default_instruction = DEFAULT_PROMPT
    options = frozenset({"instruction", "query_max_length", "cutoff_layers", "compress_ratio", "compress_layers"})

    def __init__(self, config: Config, path: str, name: str | None = None) -> None:
        snapshot = self._begin(config, path, "lightweight", name)
        self.flag = self._load_flag(config, path)
        self.tokenizer, self.model = self.flag.tokenizer, self.flag.model
        self._check_limits(config, path)
        self.parameters = place(self.model, self.device, self.fp16, snapshot)
        prompt = self.flag.prompt or DEFAULT_PROMPT
        self.default_instruction = prompt
        self.encoder = PromptEncoder(
            self.tokenizer, Instructions.of(self.flag), config.max_length, prompt, bos=True, layered=True, spans=True
        )
        enc = self.encoder
        self.max_width = config.max_length + 2 * (len(enc.sep) + len(enc.prompt)) + len(enc.bos)
        self._pad_id = self.tokenizer.pad_token_id or 0
        c = self.model.config
        self.scoring_layers = list(range(c.start_layer, c.num_hidden_layers + 1, c.layer_sep))
        self._default = (
            tuple(self.flag.cutoff_layers or [c.num_hidden_layers]),
            int(self.flag.compress_ratio or 1),
            tuple(self.flag.compress_layers or DEFAULT_COMPRESS_LAYERS),
        )
        self._settings = self._default
        self.launcher = Launcher(self.model, self.device, self._scores, causal=True, buckets=None)
        self.launcher.masks_4d = False  # token compression reads (and rebuilds) the 2D mask

    def _load_flag(self, config: Config, path: str) -> LightWeightFlagLLMReranker:
        _quiet_progress_bars()
        with load_errors(path, "lightweight"):
            return load_lightweight(
                path,
                use_fp16=self.fp16,
                devices=[self.device],
                batch_size=config.batch_size or CPU_BATCH_SIZE,
                max_length=config.max_length,
            )

    def refuse(self, o: Options) -> str | None:
        why = refusal(self.name, self.family, o, self.options)
        if why is not None:
            return why
        if o.cutoff_layers and (len(o.cutoff_layers) != 1 or o.cutoff_layers[0] not in self.scoring_layers):
            return (
                f"cutoff_layers {list(o.cutoff_layers)}: model {self.name!r} scores with one layer's head, one of "
                f"{', '.join(map(str, self.scoring_layers))}"
            )
        if o.compress_ratio and o.compress_ratio not in COMPRESS_RATIOS:
            return f"compress_ratio {o.compress_ratio} is not one of {', '.join(map(str, COMPRESS_RATIOS))}"
        last = self.model.config.num_hidden_layers - 1
        if any(not 1 <= k <= last for k in o.compress_layers):
            return f"compress_layers {list(o.compress_layers)}: each must be one of 1..{last} (layers that compress)"
        return None

    def _arrays(self, batch: Sequence[Prompted], rows: int, width: int) -> Arrays:
        """Right-padded (as the class's Collater), with each row's query and prompt token counts; a row past the batch
        is one attended pad token."""
        ids = np.full((rows, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        spans = np.zeros((rows, 2), dtype=np.int64)
        for row, e in enumerate(batch):
            ids[row, : len(e)] = e.input_ids
            mask[row, : len(e)] = 1
            spans[row] = e.spans
        mask[len(batch) :, 0] = 1
        return {"input_ids": ids, "attention_mask": mask, "query_lengths": spans[:, 0], "prompt_lengths": spans[:, 1]}

    def _scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cutoff layer's score at each row's last token, the model called as compute_score calls it."""
        inputs = dict(inputs)
        if "attention_mask" not in inputs:  # no padding: the model still reads the mask
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        cutoff, ratio, compress = self._settings
        out = self.model(
            **inputs,
            output_hidden_states=True,
            compress_layer=list(compress),
            compress_ratio=ratio,
            cutoff_layers=list(cutoff),
        )
        return last_logit_pool_lightweight(out.logits[0], out.attention_masks[0]).float()

    def launch(self, batch: Sequence[Prompted]) -> Collect:
        """Start one batch's forward pass, with its requests' settings (the batcher gives a batch one request's)."""
        width = -(-max(len(e) for e in batch) // PAD_MULTIPLE) * PAD_MULTIPLE
        rows, width = self.launcher.shape(len(batch), width)
        cutoff, ratio, compress = batch[0].forward or ((), 0, ())
        default_cutoff, default_ratio, default_compress = self._default
        self._settings = (cutoff or default_cutoff, ratio or default_ratio, compress or default_compress)
        return self.launcher.launch(self._arrays(batch, rows, width), len(batch))
