"""Render deploy/k8s kustomizations offline, for what ours use: resources, components, labels, images,
strategic-merge patches. As kustomize does, a folder may not load a base that contains it ("cycle detected": an
overlay inside its own base), which kubectl refuses although the objects would render.

Strategic merge as the API server does it for the fields we patch: maps merge, `null` deletes a key, lists of
containers, env, volumes and ports merge by their key, other lists are replaced; `$patch: delete` removes the object.
A component (kind: Component) adds its resources to what it is applied to, then patches all of it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
SUPPORTED = {"apiVersion", "kind", "resources", "components", "labels", "images", "patches"}


def render(folder: Path, visited: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` would print (for the features listed above)."""
    return _build(folder, [], "Kustomization", visited)


def _build(folder: Path, docs: list[dict[str, Any]], kind: str, visited: tuple[Path, ...]) -> list[dict[str, Any]]:
    root = folder.resolve()
    cycle = [v for v in visited if v == root or root in v.parents]
    assert not cycle, f"cycle detected: candidate root '{root}' contains visited root '{cycle[0]}'"
    visited = (*visited, root)
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert k.get("kind", "Kustomization") == kind, f"{folder}: expected a {kind}, found {k.get('kind')}"
    unsupported = set(k) - SUPPORTED
    assert not unsupported, f"{folder}/kustomization.yaml uses {unsupported}: teach tests/kustomize.py first"
    docs = list(docs)
    for resource in k.get("resources", []):
        path = folder / resource
        if path.is_dir():
            docs.extend(render(path, visited))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for component in k.get("components", []):
        docs = _build(folder / component, docs, "Component", visited)
    for patch_ref in k.get("patches", []):
        assert set(patch_ref) == {"path"}, f"only file patches are supported: {patch_ref}"
        patch = yaml.safe_load((folder / patch_ref["path"]).read_text())
        (target,) = [
            d for d in docs if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        if patch.get("$patch") == "delete":
            docs.remove(target)
        else:
            merge(target, patch)
    for label in k.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in k.get("images", []):
        for d in docs:
            for c in _containers(d):
                name, _, _ = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            _merge_list(base[key], value, MERGE_KEYS[key])
        else:
            base[key] = copy.deepcopy(value)


def _merge_list(base: list[dict[str, Any]], patch: list[dict[str, Any]], key: str) -> None:
    by_key = {item[key]: item for item in base}
    for item in patch:
        if item[key] in by_key:
            merge(by_key[item[key]], item)
        else:
            base.append(copy.deepcopy(item))
