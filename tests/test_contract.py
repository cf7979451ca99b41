"""The contract lints clean and the committed stubs match it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tools.gen_proto import GENERATED, PACKAGE, generate

ROOT = Path(__file__).resolve().parent.parent


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    proc = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / PACKAGE / name).read_text()
        committed = (ROOT / PACKAGE / name).read_text()
        assert fresh == committed, f"{PACKAGE}/{name} is stale: run `python -m tools.gen_proto`"


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_contract_changes_are_additive() -> None:
    """`buf breaking` against the contract as first published (tests/contract/v1_baseline): no field renumbered,
    retyped or removed, so clients built against it keep working."""
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    proc = subprocess.run(
        [buf, "breaking", "proto", "--against", "tests/contract/v1_baseline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
