"""Flags, RERANKER_* defaults and their checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import __version__
from server import config as config_module
from server.config import DEFAULT_MODEL, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    c = load_config([], env={})
    assert (c.model, c.port, c.max_length, c.max_candidates, c.device) == (DEFAULT_MODEL, 50051, 512, 1000, "auto")
    assert c.fp16 is None


def test_environment_supplies_defaults_and_flags_win() -> None:
    env = {"RERANKER_MODEL": "/models/x", "RERANKER_PORT": "6000", "RERANKER_FP16": "false"}
    c = load_config([], env=env)
    assert (c.model, c.port, c.fp16) == ("/models/x", 6000, False)
    c = load_config(["--port", "7000", "--fp16"], env=env)
    assert (c.port, c.fp16) == (7000, True)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RERANKER_PORT"):
        load_config([], env={"RERANKER_PORT": "many"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_candidates": 0}, "max_candidates must be positive"),
        ({"max_queue_pairs": 10}, "max_queue_pairs"),
        ({"device": "tpu"}, "device must be"),
        ({"port": 70000}, "port must be"),
        ({"batch_size": -1}, "batch_size must be 0"),
        ({"tokenize_threads": -2}, "tokenize_threads must be 0"),
        ({"max_batch_tokens": 100}, "max_batch_tokens .100. must be at least max_length"),
    ],
)
def test_invalid_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**kwargs)  # type: ignore[arg-type]


def test_bad_flag_exits_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_config(["--max-candidates", "0"], env={})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-candidates (RERANKER_MAX_CANDIDATES) must be positive" in err


def test_batch_budgets_default_to_the_device(engine: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """0 = sized for the device: on CPU today's 32 pairs and 16384 tokens; a flag wins over the size."""
    auto = engine.batching(Config())  # type: ignore[attr-defined]
    assert (auto.batch_size, auto.max_batch_tokens, auto.source) == (32, 16384, "cpu defaults")
    given = engine.batching(Config(batch_size=8, max_batch_tokens=4096))  # type: ignore[attr-defined]
    assert (given.batch_size, given.max_batch_tokens, given.source) == (8, 4096, "flags")
    assert load_config(["--tokenize-threads", "3"], env={}).tokenize_thread_count == 3
    for cpus, threads in [(None, 1), (1, 1), (2, 1), (6, 3), (16, 8), (64, 8)]:  # half the cores, 1 to 8
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert Config().tokenize_thread_count == threads, cpus


def test_tokenize_workers_auto_fits_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: none on CPU; on CUDA half the cores, 2 to 8; a number (0 included) is taken as given."""
    from server.tokenize.tokenizing import worker_count

    assert load_config([], env={}).tokenize_workers == -1
    assert load_config(["--tokenize-workers", "auto"], env={}).tokenize_workers == -1
    assert load_config([], env={"RERANKER_TOKENIZE_WORKERS": "auto"}).tokenize_workers == -1
    assert load_config(["--tokenize-workers", "3"], env={}).tokenize_workers == 3
    with pytest.raises(ConfigError, match="tokenize_workers must be auto, 0"):
        Config(tokenize_workers=-2)
    for cpus, on_cuda in [(2, False), (64, False)]:
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert worker_count(-1, on_cuda) == 0
    for cpus, workers in [(None, 2), (2, 2), (6, 3), (16, 8), (64, 8)]:
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert worker_count(-1, True) == workers, cpus
        assert worker_count(0, True) == 0 and worker_count(5, False) == 5


def _server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m server ARGS`, with Python reporting every module it imports (-X importtime)."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "server", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--help"], {}, 0, None),
        (["--version"], {}, 0, None),
        (["--max-lenght", "10"], {}, 2, "python -m server: error: unrecognized arguments: --max-lenght 10"),
        (["--port", "x"], {}, 2, "argument --port: invalid int value: 'x'"),
        (["--max-candidates", "0"], {}, 2, "--max-candidates (RERANKER_MAX_CANDIDATES) must be positive, got 0"),
        (
            [],
            {"RERANKER_FP16": "maybe"},
            2,
            "RERANKER_FP16='maybe': not a boolean: use 1/true/yes/on or 0/false/no/off",
        ),
        ([], {"RERANKER_PORT": "many"}, 2, "python -m server: error: RERANKER_PORT='many': not an integer"),
    ],
)
def test_the_command_line_answers_before_torch_is_imported(
    args: list[str], env: dict[str, str], code: int, message: str | None
) -> None:
    """--help, --version and every configuration error come from the flags alone: no torch, one line for errors."""
    proc = _server(*args, env=env)
    assert proc.returncode == code, proc.stderr
    assert not {m for m in _imported(proc.stderr) if m.split(".")[0] in ("torch", "FlagEmbedding", "transformers")}
    if message is None:
        assert proc.stdout.startswith(
            "usage: python -m server" if args == ["--help"] else f"python -m server {__version__}"
        )
    else:
        (line,) = _said(proc.stderr)  # one line, no usage block, no traceback
        assert message in line, line


def test_python_m_clients_names_itself() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "clients", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m clients "), proc.stdout


def test_torch_threads_default_to_the_cores_this_process_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0: the CPU affinity, capped by a cgroup v2 CPU limit (rounded up), at least 1; a number as given."""
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(config_module, "CGROUP_CPU_MAX", str(cpu_max))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    for text, cpus in [(None, 64), ("max 100000", 64), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1)]:
        if text is None:
            cpu_max.unlink(missing_ok=True)
        else:
            cpu_max.write_text(text + "\n")
        assert config_module.usable_cpus() == cpus, text
        assert Config().torch_threads == cpus and Config(threads=3).torch_threads == 3
