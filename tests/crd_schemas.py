"""Validate custom resources offline against KEDA's and the Prometheus Operator's published CRD schemas.

The schemas come as pydantic models generated from each project's CRDs (cloudcoil-models-keda and
cloudcoil-models-prometheus-operator, pinned in pyproject.toml): types, enums, patterns and required fields are
checked by validating; unknown (or misspelt) fields, which the models would drop silently, by comparing the object
with the model's own dump of it.
"""

from __future__ import annotations

from typing import Any

# (apiVersion, kind) -> (module, class): the CRDs our manifests use
MODELS = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("cloudcoil.models.keda.v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("cloudcoil.models.prometheus_operator.v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("cloudcoil.models.prometheus_operator.v1", "PrometheusRule"),
}


class CrdError(AssertionError):
    pass


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in MODELS


def validate(doc: dict[str, Any]) -> None:
    """Raise CrdError naming the first problem of `doc` against its CRD's schema."""
    import importlib

    import pydantic

    module, name = MODELS[(doc["apiVersion"], doc["kind"])]
    model = getattr(importlib.import_module(module), name)
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise CrdError(f"{doc['kind']}/{doc['metadata']['name']}: {exc}") from None
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    problem = _first_difference(doc, dumped, "")
    if problem:
        raise CrdError(f"{doc['kind']}/{doc['metadata']['name']}: {problem}")


def _first_difference(given: Any, known: Any, path: str) -> str | None:
    """Where `given` has something the schema does not know (a field it dropped) or changed."""
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                return f"{path}.{key}: unknown field (not in the CRD's schema)"
            found = _first_difference(value, known[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(given, list) and isinstance(known, list) and len(given) == len(known):
        for i, (a, b) in enumerate(zip(given, known, strict=True)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if given == known else f"{path}: {given!r} reads as {known!r}"
