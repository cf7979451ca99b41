"""What the two installs give: the server on the server lock's packages alone, and the client package in a fresh venv.

The server runs on a copy of site-packages that holds only the server lock's distributions (links to this
environment's files), so a package the server needs but the lock leaves out fails here, not in the image. The client
wheel is built from clients/pyproject.toml and installed into a new venv from the package index, with no server and
no torch; its blocking client, asyncio client and command line then call a real server.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import FP32_REORDERED
from tests.subprocess_server import ServerProcess, free_port
from tools.lock import SERVER_LOCK, TORCH, read_lock

ROOT = Path(__file__).resolve().parent.parent
QUERY = "what is panda?"
CANDIDATES = ["hi", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."]
CLIENT_REQUIRES = {"grpcio", "grpcio-health-checking", "protobuf", "typing-extensions"}
VENV_OWN = {"pip", "setuptools"}  # what `python -m venv` puts in every venv


LEFT_OUT = ["sentence_transformers", "ir_datasets", "sklearn", "scipy", "grpc_tools"]
# Every module of the server (each model family's included) and the bridge, then which of argv are importable.
PROBE = """
import importlib, importlib.util, json, pkgutil, sys
import rest_bridge, server
for package in (server, rest_bridge):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))
"""


def locked_site(dest: Path) -> Path:
    """A site-packages folder holding only the server lock's distributions (and torch), as links to this one's."""
    wanted = {name: locked.version for name, locked in read_lock(SERVER_LOCK).items()}
    wanted[TORCH] = md.version(TORCH)
    for name, version in wanted.items():
        dist = md.distribution(name)
        assert dist.version == version, (
            f"{name} {dist.version} here, {version} in {SERVER_LOCK.name}: "
            f"`pip install --no-deps -r requirements-dev.lock` to test the lock"
        )
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if ".." in file.parts or not source.exists():  # scripts outside site-packages; files never written
                continue
            (dest / file).parent.mkdir(parents=True, exist_ok=True)
            if not (dest / file).exists():
                (dest / file).symlink_to(source)
    return dest


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return locked_site(tmp_path_factory.mktemp("locked") / "site-packages")


def on_the_lock(site: Path) -> dict[str, str]:
    """With `python -S` (no site-packages of this environment): the lock's copy instead."""
    return {"PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def locked_server(model_dir: Path, site: Path, rest_port: int) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        model_dir,
        site.parent / "server.log",
        "--rest-port",
        str(rest_port),
        python=(sys.executable, "-S"),
        env=on_the_lock(site),
    )
    yield srv
    srv.stop()


def test_the_server_serves_grpc_and_rest_on_the_server_lock_alone(
    locked_server: ServerProcess, site: Path, rest_port: int
) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/health", timeout=10) as answer:
        assert answer.status == 200
    found = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, *LEFT_OUT],
        cwd=ROOT,
        env=os.environ | on_the_lock(site),
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 0, found.stderr  # every module of the server and the bridge imports on the lock
    assert json.loads(found.stdout) == []  # and the lock holds none of what it leaves out


# --- the client package --------------------------------------------------------------------------


def test_the_client_package_requires_what_its_stubs_check_and_ships_with_the_server() -> None:
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert client["version"] == server["version"]
    requires = {canonicalize_name(r.name): r for r in map(Requirement, client["dependencies"])}
    assert set(requires) == CLIENT_REQUIRES
    stubs = ROOT / "reranker_proto"
    grpc_floor = re.search(r"GRPC_GENERATED_VERSION = '(.+)'", (stubs / "reranker_pb2_grpc.py").read_text())
    protobuf_floor = re.search(r"Protobuf Python Version: (\d+)\.(\S+)", (stubs / "reranker_pb2.py").read_text())
    assert grpc_floor and protobuf_floor, "the generated stubs no longer say which versions they need"
    major, rest = protobuf_floor.groups()
    assert str(requires["grpcio"].specifier) == f"<2,>={grpc_floor.group(1)}"
    assert str(requires["protobuf"].specifier) == f"<{int(major) + 1},>={major}.{rest}"
    locked = read_lock(SERVER_LOCK)
    outside = {n: locked[n].version for n, r in requires.items() if not r.specifier.contains(locked[n].version)}
    assert not outside, f"the lock's versions, which CI tests the client with, are outside its requirements: {outside}"


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the client wheel and what it requires, from the index at the lock's versions."""
    tmp = tmp_path_factory.mktemp("client")
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for folder in ("clients", "reranker_proto"):  # a clean copy: the build writes build/ beside the sources
        shutil.copytree(ROOT / folder, tmp / "src" / folder, ignore=skip)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", tmp / "src" / "clients", "-w", tmp / "dist", cwd=tmp)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("reranker_client-*-py3-none-any.whl")
    venv = tmp / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp).returncode == 0
    installed = run(venv / "bin" / "pip", "install", "-c", SERVER_LOCK, wheel, cwd=tmp)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def test_the_client_installs_alone(client_venv: Path) -> None:
    listed = run(client_venv / "bin" / "pip", "list", "--format", "json", cwd=client_venv)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert names - VENV_OWN == {"reranker-client"} | CLIENT_REQUIRES  # no torch, no server, no FlagEmbedding
    for absent in ("torch", "server", "FlagEmbedding"):
        probe = run(client_venv / "bin" / "python", "-c", f"import {absent}", cwd=client_venv)
        assert f"No module named '{absent}'" in probe.stderr


CALLS = """
import asyncio, json, sys
import clients
from clients import AsyncRerankerClient, RerankerClient

target, query, candidates = sys.argv[1], sys.argv[2], sys.argv[3:]
with RerankerClient(target) as client:
    out = client.rerank(query, candidates, top_n=1, return_documents=True)
    sync = {"scores": out.scores, "best": out.results[0].document, "health": client.health(),
            "models": client.model_info().models}

async def main():
    async with AsyncRerankerClient(target) as client:
        await client.wait_until_ready(timeout=30)
        return await client.score_pairs([(query, c) for c in candidates])

print(json.dumps({"from": clients.__file__, "sync": sync, "async": asyncio.run(main())}))
"""


def test_the_installed_client_calls_a_real_server(
    client_venv: Path, locked_server: ServerProcess, flag_reranker: Any
) -> None:
    expected = flag_reranker.compute_score([[QUERY, c] for c in CANDIDATES])
    bin_ = client_venv / "bin"
    called = run(bin_ / "python", "-c", CALLS, locked_server.target, QUERY, *CANDIDATES, cwd=client_venv)
    assert called.returncode == 0, called.stderr
    out = json.loads(called.stdout)
    assert out["from"].startswith(str(client_venv))  # the installed package, not this checkout
    assert out["sync"]["scores"] == pytest.approx(expected, **FP32_REORDERED)
    assert out["sync"]["best"] == CANDIDATES[expected.index(max(expected))]
    assert out["sync"]["health"] == "SERVING" and len(out["sync"]["models"]) == 1
    assert out["async"] == pytest.approx(expected, **FP32_REORDERED)

    flags = ["--target", locked_server.target, "--query", QUERY, *(a for c in CANDIDATES for a in ("--candidate", c))]
    for cli in ([bin_ / "reranker-client"], [bin_ / "python", "-m", "clients"]):
        ranked = run(*cli, "rerank", *flags, cwd=client_venv)
        assert ranked.returncode == 0, ranked.stderr
        assert json.loads(ranked.stdout)["scores"] == pytest.approx(expected, **FP32_REORDERED)
        assert run(*cli, "health", "--target", locked_server.target, cwd=client_venv).returncode == 0
    down = run(
        bin_ / "reranker-client", "health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1", cwd=client_venv
    )
    assert down.returncode == 1 and down.stderr.startswith("error: ")
