"""The README's quick start chains: its Run command serves every documented port, each example that calls the
service runs as written against that command (on free ports, the tiny model), and its startup line is the one the
server prints."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import load_config
from tests.subprocess_server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PORTS = {"grpc": 50051, "rest": 6009, "metrics": 9090}  # what the README promises
BLOCK = re.compile(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", re.M | re.S)
NOT_HERE = ("Security", "Docker", "Kubernetes")  # certificates, images, clusters: tested by their own tests
STARTS_A_SERVER = ("python -m server", "python -m rest_bridge", "python -m tools.make_model")


def blocks() -> Iterator[tuple[str, str, str]]:
    """(section, language, text) of every fenced block."""
    section = ""
    for m in BLOCK.finditer(README):
        if m.group(1):
            section = m.group(1).lstrip("# ")
        else:
            yield section, m.group(2), m.group(3)


def commands(text: str) -> list[str]:
    """Shell commands of a block, continuation lines joined."""
    return [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def run_command() -> list[str]:
    section, _, text = next(b for b in blocks() if b[0] == "Run")
    return shlex.split(commands(text)[0])


def examples() -> list[tuple[str, str, str]]:
    found = []
    for section, language, text in blocks():
        if "localhost:" not in text or section in NOT_HERE:
            continue
        if language == "sh":
            text = "\n".join(c for c in commands(text) if not c.startswith(STARTS_A_SERVER))
        if text.strip():
            found.append((section, language, text))
    return found


EXAMPLES = examples()


def test_the_run_command_serves_grpc_rest_and_metrics_on_the_documented_ports() -> None:
    argv = run_command()
    assert argv[:3] == ["python", "-m", "server"], argv
    config = load_config(argv[3:], env={})
    assert (config.port, config.rest_port, config.metrics_port) == (PORTS["grpc"], PORTS["rest"], PORTS["metrics"])
    dockerfile = (ROOT / "Dockerfile").read_text()  # the image serves the same ports (test_deploy: k8s agrees)
    assert (
        f"RERANKER_REST_PORT={PORTS['rest']}" in dockerfile
        and f"RERANKER_METRICS_PORT={PORTS['metrics']}" in dockerfile
    )
    offline = [shlex.split(c) for b in blocks() if b[0] == "Run" for c in commands(b[2]) if "./models/tiny" in c]
    served = [a for a in offline if a[:3] == ["python", "-m", "server"]]
    assert served and served[0][5:] == argv[5:], "the offline quick start serves the same ports as the Run command"


@pytest.fixture(scope="module")
def quick_start(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict]]:
    """The Run command's flags on free ports (ServerProcess adds --model, --host and --port)."""
    ports = {"rest": free_port(), "metrics": free_port()}
    flags = run_command()[5:]
    for name, port in ports.items():
        flags[flags.index(f"--{name}-port") + 1] = str(port)
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("readme") / "server.log", *flags)
    yield srv, {"grpc": srv.port, **ports}
    srv.stop()


def as_here(text: str, ports: dict[str, int]) -> str:
    for name, port in ports.items():
        text = text.replace(f"localhost:{PORTS[name]}", f"127.0.0.1:{port}")
    return text


@pytest.mark.parametrize(
    ("section", "language", "text"), EXAMPLES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(EXAMPLES)]
)
def test_every_example_runs_as_written_against_the_run_command(
    quick_start: tuple[ServerProcess, dict], tmp_path: Path, section: str, language: str, text: str
) -> None:
    srv, ports = quick_start
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python`
    if language == "python":
        script = tmp_path / "example.py"
        script.write_text(as_here(text, ports))
        argv = [sys.executable, str(script)]
    else:
        assert language == "sh", language
        script = as_here(text, ports).replace("curl -s ", "curl -sS --fail-with-body ")  # an HTTP error fails it
        if shutil.which("grpcurl") is None:
            script = script.replace("grpcurl ", f"{sys.executable} -m tests.grpcurl ")
        argv = ["bash", "-e", "-o", "pipefail", "-c", script]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{section}:\n{script}\n{out}"
    assert out.strip() and "error" not in out.lower(), f"{section}:\n{script}\n{out}"  # legacy 1's code -1 too
    assert '"code": -1' not in out


def keys(line: str) -> list[str]:
    return re.findall(r" (\w+)=", line.split(" serving ", 1)[1])


def test_the_sample_startup_line_is_what_the_run_command_prints(quick_start: tuple[ServerProcess, dict]) -> None:
    srv, ports = quick_start
    sample = next(t for s, lang, t in blocks() if s == "Run" and " serving model=" in t).strip()
    printed = next(line for line in srv.log().splitlines() if " serving model=" in line)
    assert keys(sample) == keys(printed)
    for name, key in (("grpc", "grpc_port"), ("rest", "rest_port"), ("metrics", "metrics_port")):
        assert f" {key}={PORTS[name]} " in sample and f" {key}={ports[name]} " in printed


def test_ci_runs_the_readmes_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_block = next(t for s, lang, t in blocks() if s == "Test" and lang == "sh")
    for command in commands(test_block):
        assert command in ci, f"README's test command is not in .ci/run: {command}"


def test_models_made_by_the_quick_start_are_not_committed() -> None:
    assert "models/" in (ROOT / ".gitignore").read_text().splitlines()
