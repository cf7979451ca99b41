"""Models that ship their own Python code (auto_map in config.json), which transformers runs only when trusted."""

from __future__ import annotations

import json
import os
from typing import Any

# The auto classes a cross-encoder is loaded through, by the file whose auto_map may send them to the model's code.
AUTO_CLASSES = {
    "config.json": ("AutoConfig", "AutoModelForSequenceClassification"),
    "tokenizer_config.json": ("AutoTokenizer",),
}


def _read_json(path: str, name: str) -> dict[str, Any]:
    """A model's json file from its directory, or for a hub id from the hub (empty when it has none)."""
    try:
        if os.path.isdir(path):
            file = os.path.join(path, name)
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, name)
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except Exception:  # no such file, or not json: loading reports what is wrong with it
        return {}
    return data if isinstance(data, dict) else {}


def shipped_code(path: str) -> dict[str, str]:
    """The auto classes the model maps to code of its own, e.g. {"AutoModelForSequenceClassification":
    "modeling_xlm_roberta.XLMRobertaForSequenceClassification"} (a tokenizer's map lists [slow, fast]: the last)."""
    found: dict[str, str] = {}
    for name, classes in AUTO_CLASSES.items():
        auto_map = _read_json(path, name).get("auto_map")
        if not isinstance(auto_map, dict):
            continue
        for cls in classes:
            ref = auto_map.get(cls)
            refs = [ref] if isinstance(ref, str) else [r for r in ref or [] if isinstance(r, str)]
            if refs:
                found[cls] = refs[-1]
    return found


def remote_code_refusal(path: str, trusted: bool) -> str | None:
    """Why the model at `path` may not load without --trust-remote-code, or None. Untrusted, transformers would fail
    on it, or load its own class of the same name with these weights and score wrongly without a word."""
    code = shipped_code(path)
    if not code or trusted:
        return None
    mapped = ", ".join(f"{cls} -> {ref}" for cls, ref in code.items())
    return (
        f"{path} ships its own model code ({mapped}): start the server with --trust-remote-code "
        "(RERANKER_TRUST_REMOTE_CODE=1) to run it; that code runs inside the server with the server's permissions, "
        "so only for a model whose source you trust"
    )
