"""`python -m bench.gpu` runs end to end on a machine without a GPU (small loads), so it is ready when one is lent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_runs_on_cpu(model_dir: Path) -> None:
    args = ["--device", "cpu", "--shape", "tiny", "--model", str(model_dir), "--no-write", "--no-infinity"]
    args += ["--clients", "4", "--per-client", "2", "--big", "40"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| our server, default flags |" in out and "server / ceiling:" in out
    parity = float(out.split("max |server - compute_score| = ")[1].split()[0])
    assert parity < 1e-4  # fp32 on CPU: the served scores are compute_score's
