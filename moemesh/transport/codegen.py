"""Regenerate the checked-in gRPC stubs from proto/moemesh.proto: `python -m moemesh.transport.codegen [OUT]`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "proto" / "moemesh.proto"
HERE = Path(__file__).parent


def generate(out: Path = HERE) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO.parent}", f"--python_out={out}", f"--grpc_python_out={out}", PROTO.name]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    grpc_file = out / "moemesh_pb2_grpc.py"
    # Generated code imports its sibling as a top-level module; inside the package it must be relative.
    grpc_file.write_text(re.sub(r"^import moemesh_pb2 as", "from . import moemesh_pb2 as", grpc_file.read_text(), flags=re.M))
    return [out / "moemesh_pb2.py", grpc_file]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
