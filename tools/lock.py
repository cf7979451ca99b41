"""Regenerate the locked dependency sets from pyproject.toml: `python -m tools.lock [--upgrade]`.

requirements-dev.lock  every package the project and all its extras need, each at one exact version (CI, develop)
requirements.lock      the server's share of it at the same versions (README "Run the server", the Dockerfile)

`uv pip compile` (uv is in `.[test]`) resolves both for CPython 3.11 on Linux x86_64, what CI and the image run,
keeping every pin already in the files that still fits (`--upgrade` moves them all to the newest that fit).
torch is left out of both: pyproject.toml pins it, and its own install command picks the build (the CPU wheel, or
the GPU image's CUDA one); the lock holds its dependencies as the CPU build resolves them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SERVER_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
COMMAND = "python -m tools.lock"
TORCH = "torch"
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
# FlagEmbedding requires these for its embedder fine-tuning and evaluation, which the server never imports
# (tests/test_packaging.py runs the server on the server lock alone). Together with what only they pull in
# (scikit-learn, scipy, lxml...) they are ~230 MB of the image. Kept when a requirement of pyproject.toml names one.
NEVER_IMPORTED = ("sentence-transformers", "ir-datasets")
PROJECT = "reranker-service (pyproject.toml)"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_VIA = re.compile(r"^ +# +(?:via)? *(.*)$")  # "    # via x", or "    # via" then "    #   x" per line


def pyproject() -> dict[str, list[Requirement]]:
    """The project's requirements: "" for the server's own, then one entry per extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    own = project["name"].lower().replace("_", "-")  # an extra naming another (`reranker-service[tracing]`)
    return {
        name: [r for r in map(Requirement, reqs) if r.name.lower().replace("_", "-") != own]
        for name, reqs in groups.items()
    }


class Locked(NamedTuple):
    version: str
    via: frozenset[str]  # what asked for it, from uv's annotations; PROJECT for pyproject.toml itself


def read_lock(path: Path) -> dict[str, Locked]:
    """{canonical name: (version, what asked for it)} of a lock file written by uv pip compile."""
    out: dict[str, Locked] = {}
    name = ""
    for line in path.read_text().splitlines():
        if pin := _PIN.match(line):
            name = canonicalize_name(pin.group(1))
            out[name] = Locked(pin.group(2), frozenset())
        elif name and (via := _VIA.match(line)) and via.group(1):
            out[name] = out[name]._replace(via=out[name].via | {via.group(1).strip()})
    return out


def torch_source() -> list[str]:
    """Where uv finds torch's CPU build: a folder of pip's find-links holding the wheel, else PyTorch's CPU index."""
    folders = [p for p in os.environ.get("PIP_FIND_LINKS", "").split() if any(Path(p).glob("torch-*+cpu-*.whl"))]
    return [f"--find-links={f}" for f in folders] or ["--torch-backend=cpu"]


def compile_lock(out: Path, extras: list[str], named: set[str], *extra_args: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as excludes:
        excludes.write("\n".join(n for n in NEVER_IMPORTED if n not in named) + "\n")
        excludes.flush()
        args = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", *PLATFORM, *torch_source()]
        args += [f"--extra={e}" for e in extras]
        args += ["--excludes", excludes.name, "--no-emit-package", TORCH, "--custom-compile-command", COMMAND]
        subprocess.run([*args, *extra_args, "--quiet", "-o", str(out)], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest version that fits")
    args = parser.parse_args(argv)
    groups = pyproject()
    names = {g: {canonicalize_name(r.name) for r in reqs} for g, reqs in groups.items()}
    every = set().union(*names.values())
    extras = [g for g in groups if g]
    # The whole set first; the server's share is then resolved inside it, so both files agree on every version.
    compile_lock(DEV_LOCK, extras, every, *(["--upgrade"] if args.upgrade else []))
    compile_lock(SERVER_LOCK, [], names[""], "--constraints", str(DEV_LOCK))
    server, dev = read_lock(SERVER_LOCK), read_lock(DEV_LOCK)
    print(f"{SERVER_LOCK.name}: {len(server)} packages; {DEV_LOCK.name}: {len(dev)} (+ torch, installed first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
