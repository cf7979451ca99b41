"""Which precision a cross-encoder runs in (--dtype), and whether this machine runs it faster than fp32.

fp32 is exact (scores equal compute_score's). bf16 and fp16 cast the weights; int8 runs an ONNX Runtime copy of the
model with int8 weights (server/engine/onnx_int8.py). Each of those three is approximate: its drift from fp32 is
measured at load (server/engine/drift.py).
"""

from __future__ import annotations

import torch

CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # instructions that compute in bf16 natively; without them bf16 is emulated
NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}  # as GetModelInfo's dtype says
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A --dtype this machine cannot run well; the message says why and what to use instead."""


def cpu_flags(path: str) -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where it cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return set()


def native_bf16(path: str) -> str | None:
    """The flag that gives this CPU native bf16 (avx512_bf16, amx_bf16), or None."""
    flags = cpu_flags(path)
    if flags is None:  # no /proc/cpuinfo: ask torch
        return "avx512_bf16" if torch.backends.cpu.get_cpu_capability() == "AVX512" and _torch_bf16() else None
    return next((f for f in BF16_FLAGS if f in flags), None)


def _torch_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def resolve(requested: str, device: str, fp16_flag: bool | None) -> str:
    """fp32, bf16, fp16 or int8 for --dtype `requested` on `device`; PrecisionError where it would not pay.
    auto: fp16 on CUDA (unless --no-fp16), fp32 on CPU."""
    cuda, cpuinfo = device.startswith("cuda"), CPUINFO  # read here: tests point CPUINFO at a CPU without bf16
    if requested == "auto":
        return "fp16" if cuda and fp16_flag is not False else "fp32"
    if requested == "fp16" and not cuda:
        raise PrecisionError(
            "--dtype fp16 is for CUDA: CPUs compute fp16 by converting it, slower than fp32; on CPU use bf16 (with "
            "avx512_bf16 or AMX) or int8"
        )
    if requested == "int8" and cuda:
        raise PrecisionError("--dtype int8 is a CPU mode (ONNX Runtime); on CUDA use fp16 or bf16")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"--dtype bf16: {device} does not compute in bf16; use fp16")
    if requested == "bf16" and not cuda and native_bf16(cpuinfo) is None:
        raise PrecisionError(
            f"--dtype bf16 refused: this CPU has no native bf16 ({' or '.join(BF16_FLAGS)} not in {cpuinfo}), "
            "so bf16 would run slower than fp32; use fp32, or int8"
        )
    return requested
