"""The int8 CPU mode: the cross-encoder exported to ONNX once, its weights quantized to int8 per output channel
(ONNX Runtime's dynamic quantization), run by ONNX Runtime one pair at a time.

Dynamic quantization scales a tensor's activations by its own range, so in a padded batch a pair's score would depend
on the pairs (and the padding) beside it: the same request answered differently as the batcher grouped it (by up to
0.02 on the base shape, measured). Each pair is therefore run alone, unpadded, and its score is a function of the pair
only, as in fp32. Measured on 2 cores, base shape, 256 pairs against length-sorted padded batches of 32: 0.65x the
pairs/s for pairs of 23-59 tokens, 1.5x for 31-262 tokens, 1.9x for 94-512 (no padding, smaller activations).

The conversion is cached by model revision under --quantize-cache (never in the model's directory), so a restart or
a second server loads it in seconds; a changed model has a new revision and is converted again. It takes our exact
token ids and 2D attention mask, as the torch model does. ONNX Runtime is an optional dependency (the [int8] extra).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.engine.launch import Arrays, Collect, expand_mask
from server.engine.precision import PrecisionError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the export or the quantization changes: older conversions are then not reused
OPSET = 17
MODEL_FILE = "model-int8.onnx"


def default_cache() -> Path:
    return Path.home() / ".cache" / "reranker-service" / "int8"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise PrecisionError(
            "--dtype int8 needs ONNX Runtime, an optional extra: pip install 'reranker-service[int8]' "
            "(onnxruntime and onnx)"
        ) from None
    return onnxruntime


class _Scores(torch.nn.Module):
    """What the ONNX graph computes: raw scores from ids and a 2D mask (built into an additive 4D mask here, by tensor
    ops, so the trace has no branch on whether a batch is padded)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs, strict=True))
        kwargs["attention_mask"] = expand_mask(kwargs["attention_mask"], False, "eager", torch.float32)
        return self.model(**kwargs, return_dict=True).logits.view(-1)


def cached_model(source: str, revision: str, example: Arrays, cache: str) -> tuple[Path, bool]:
    """The int8 ONNX file of model `source`'s revision under `cache`, converted now if absent (in a child process);
    (path, whether it was cached)."""
    ort = _onnxruntime()
    import onnx

    key = hashlib.blake2b(
        f"{FORMAT} {OPSET} {torch.__version__} {ort.__version__} {onnx.__version__} {sorted(example)}".encode(),
        digest_size=4,
    ).hexdigest()
    root = Path(cache).expanduser() if cache else default_cache()
    final = root / f"{revision}-{key}"
    if (final / MODEL_FILE).is_file():
        return final / MODEL_FILE, True
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))  # same filesystem: the rename below is atomic
    try:
        started = time.perf_counter()
        _convert_apart(source, example, work)
        seconds = round(time.perf_counter() - started, 1)
        meta = {"revision": revision, "format": FORMAT, "torch": torch.__version__, "onnxruntime": ort.__version__}
        (work / "conversion.json").write_text(json.dumps(meta | {"seconds": seconds}))
        try:
            work.rename(final)
        except OSError:  # another server converted it meanwhile: use theirs
            if not (final / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / MODEL_FILE, False


def _convert_apart(source: str, example: Arrays, work: Path) -> None:
    """Convert in a process of its own: export and quantization peak at several times the model's size (about 7 GB
    for the base shape), memory this server's heap would otherwise keep after it is freed."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_convert_from, args=(source, example, str(work), os.getpid()), name="int8-conversion", daemon=True
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise PrecisionError(f"converting {source} to int8 failed (exit code {child.exitcode}; the log says why)")


def _convert_from(source: str, example: Arrays, work: str, parent: int) -> None:
    import threading

    from server.tokenize.worker import exit_with_parent

    # A SIGKILLed server must not leave a conversion running (minutes, gigabytes) with no one to use it.
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(source).eval()  # as FlagReranker loads it
    _convert(model, example, Path(work))


def _convert(model: torch.nn.Module, example: Arrays, work: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = list(example)
    fp32 = work / "model-fp32.onnx"
    tensors = tuple(torch.from_numpy(a) for a in example.values())
    axes = {n: {0: "rows", 1: "width"} for n in names} | {"scores": {0: "rows"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        torch.onnx.export(
            _Scores(model, names), tensors, str(fp32), input_names=names, output_names=["scores"],
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, on the root logger
    try:
        quantize_dynamic(str(fp32), str(work / MODEL_FILE), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(quiet)
    for f in work.iterdir():  # the fp32 export (and any external data it wrote) is not needed any more
        if f.name != MODEL_FILE:
            f.unlink()


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()) / 2**20


class OnnxLauncher:
    """Runs the int8 model over padded numpy batches: the CPU Launcher's interface (server.engine.launch)."""

    cuda = False
    buckets = None
    masks_4d = False

    def __init__(self, path: Path, threads: int) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: the cores are shared with the event loop and the tokenizers
        # (under load on 2 cores: 1 x 10 p50 935 ms without spinning, 1,565 ms with, pairs/s the same or better).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No arena: it would keep the largest batch's activations for good (measured: no slower without it).
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def shape(self, rows: int, width: int) -> tuple[int, int]:
        return rows, width

    def launch(self, arrays: Arrays, rows: int) -> Collect:
        """Score the batch here, each pair alone and without its padding (see the module's doc: a pair's int8
        score must not depend on its batch); the returned function hands the scores over."""
        scores = []
        for row in range(rows):
            cols = np.flatnonzero(arrays["attention_mask"][row])  # the pair's tokens: one run, left or right padded
            span = slice(int(cols[0]), int(cols[-1]) + 1)
            feed = {k: np.ascontiguousarray(arrays[k][row : row + 1, span]) for k in self.inputs}
            scores.append(float(self.session.run(["scores"], feed)[0][0]))
        return lambda: scores

    def check_masks(self, arrays: Arrays) -> None:
        """The graph builds its own mask: nothing to check."""

    def capture(self, mode: str, samples: list[Arrays]) -> str:
        return "off (CUDA only)"
