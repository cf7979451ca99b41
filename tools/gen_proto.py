"""Regenerate reranker_proto/ from proto/reranker.proto: `python -m tools.gen_proto [OUT_DIR]`.

The proto is mapped to the virtual path reranker_proto/ so the generated modules import each other as
`from reranker_proto import ...`, the same way server, client and bridge import them.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "reranker_proto"
GENERATED = ("reranker_pb2.py", "reranker_pb2.pyi", "reranker_pb2_grpc.py")


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Write the generated modules under out_dir/reranker_proto/ and return their paths."""
    (out_dir / PACKAGE).mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PACKAGE}={ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "proto" / "reranker.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/reranker.proto")
    return [out_dir / PACKAGE / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
