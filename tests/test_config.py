"""Flags, RERANKER_* defaults and their checks."""

from __future__ import annotations

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
    ],
)
def test_invalid_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**kwargs)  # type: ignore[arg-type]


def test_bad_flag_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--max-candidates", "0"], env={})
    assert "max_candidates must be positive" in capsys.readouterr().err
