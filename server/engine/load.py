"""Loading a served model with the class its kind needs: the one place that knows both model classes."""

from __future__ import annotations

from typing import Any

from server.config import Config
from server.engine.llm_model import LLMRerankerModel, model_kind
from server.engine.model import RerankerModel, resolve_model_path


def load_engine(config: Config, model: str, name: str) -> Any:
    """Load `model` (hub id or directory) under `name` with the class its kind needs (config.json, --model-type)."""
    path = resolve_model_path(model)  # once: for a hub id it probes the network
    kind = model_kind(path, config.model_type)
    if kind == "cross-encoder":
        return RerankerModel(config, path, name)
    return LLMRerankerModel(config, path, kind, name)
