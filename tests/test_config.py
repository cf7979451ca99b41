"""Flags, RERANKER_* defaults and their checks."""

from __future__ import annotations

import os

import pytest

from server.config import DEFAULT_MODEL, Config, ConfigError, load_config


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


def test_bad_flag_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--max-candidates", "0"], env={})
    assert "max_candidates must be positive" in capsys.readouterr().err


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
