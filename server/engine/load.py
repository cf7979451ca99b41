"""Loading a served model with the class its kind needs: the one place that knows both model classes."""

from __future__ import annotations

from typing import Any

from server.config import Config
from server.engine.llm_model import LLMRerankerModel, model_kind
from server.engine.model import RerankerModel, resolve_model_path
from server.engine.qwen3 import MxbaiRerankV2Model, Qwen3RerankerModel


def load_engine(config: Config, model: str, name: str) -> Any:
    """Load `model` (hub id or directory) under `name` with the class its kind needs (config.json, --model-type)."""
    path = resolve_model_path(model)  # once: for a hub id it probes the network
    kind = model_kind(path, config.model_type, model)
    if kind == "cross-encoder":
        return RerankerModel(config, path, name)
    if kind == "qwen3-reranker":
        return Qwen3RerankerModel(config, path, name)
    if kind == "mxbai-rerank-v2":
        return MxbaiRerankV2Model(config, path, name)
    if kind == "lightweight":
        from server.engine.lightweight import LightweightModel  # FlagEmbedding's model code, imported when served

        return LightweightModel(config, path, name)
    return LLMRerankerModel(config, path, kind, name)
