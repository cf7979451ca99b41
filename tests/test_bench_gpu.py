"""`python -m bench.gpu` runs end to end on a machine without a GPU (small loads), so it is ready when one is lent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_probe import BusySampler, describe_fields, startup_fields

ROOT = Path(__file__).resolve().parent.parent


def _row(out: str, label: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_bench_gpu_runs_on_cpu(model_dir: Path) -> None:
    args = ["--device", "cpu", "--shape", "tiny", "--model", str(model_dir), "--no-write", "--no-infinity"]
    args += ["--clients", "4", "--per-client", "2", "--big", "40", "--single", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    # The header says what ran, and that the ceiling met no new shape: every batch ran once before timing.
    assert "**Device CPU, fp32, model shape tiny (" in out and "torch " in out
    assert "Every shape warmed before timing: **yes**" in out and "In-process path: " in out
    warmed = re.findall(r"warmed shapes (\d+) of (\d+) batches", out)
    assert len(warmed) == 2 and all(int(a) == int(b) >= 1 for a, b in warmed), warmed
    rows = {
        "ceiling": _row(out, "ceiling:"),
        "in-process": _row(out, "the server's request path in-process"),
        "server": _row(out, "our server, `python -m server`"),
    }
    for name, cells in rows.items():  # per load: pairs/s, GPU busy, p99
        rates = [float(cells[i].replace(",", "")) for i in (1, 4)]
        assert all(r > 0 for r in rates), (name, cells)
        assert cells[2] == cells[5] == "n/a", (name, cells)  # no GPU to sample
    assert "| Infinity's engine, in-process | skipped (--no-infinity) |" in out
    ratios = _row(out, "4 clients x 1x20")
    assert float(ratios[1]) > 0 and float(ratios[2]) > 0 and ratios[3] == "—"  # server, in-process / ceiling
    for request in ("1 x 10", "1 x 100"):  # one caller at a time: p50 <= p90
        p50, p90 = (float(c.replace(",", "")) for c in _row(out, request)[1:3])
        assert 0 < p50 <= p90
    assert "5 requests one after another, after 5 untimed" in out
    sync = next(x for x in out.splitlines() if x.startswith("- No host sync in launch: "))
    assert sync.count("n/a (CUDA only)") == 2, sync  # the loaded engine and the in-process server's
    startup = next(x for x in out.splitlines() if x.startswith("- Our server's startup line: "))
    assert "device=cpu" in startup and "tokenize" in startup
    parity = float(out.split("max |server - compute_score| = ")[1].split()[0])
    assert parity < 1e-4  # fp32 on CPU: the served scores are compute_score's


def test_startup_fields_text_json_and_absent() -> None:
    line = 'x INFO server.app: serving model=m device=cuda:0 tokenize="8 processes (started in 2.1 s)" batch_size=64'
    found = startup_fields(line)
    assert found["tokenize"] == "8 processes (started in 2.1 s)" and found["device"] == "cuda:0"
    assert startup_fields('{"msg": "serving", "shapes": "12 buckets warmed in 3.0 s"}')["shapes"].startswith("12")
    described = describe_fields(found)
    assert "tokenize=8 processes (started in 2.1 s)" in described and "shapes: absent" in described


def test_busy_share_is_na_on_cpu() -> None:
    with BusySampler("cpu") as busy:
        pass
    assert busy.result() == "n/a" and not busy.samples


def test_busy_share_falls_back_to_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.gpu_probe as probe

    def no_nvml(index: int) -> None:
        raise ModuleNotFoundError("pynvml")

    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$3 $4" = "-i 3" ] && echo 42\n')  # `-i N` names the device: CUDA_VISIBLE_DEVICES=3
    smi.chmod(0o755)
    monkeypatch.setattr(probe, "_nvml_reader", no_nvml)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with BusySampler("cuda:0", period_s=0.01) as busy:
        time.sleep(0.1)
    assert busy.result().startswith("42% (") and busy.result().endswith(" samples, nvidia-smi)")
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert BusySampler("cuda:0").result().startswith("unavailable (")  # neither: said, not a crash
