"""Regenerate the checked-in gRPC stubs from proto/moemesh.proto: `python -m moemesh.transport.codegen [OUT]`; and read
what a set of stubs defines (messages, services), to compare two sets without the generators' version strings."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from google.protobuf.descriptor_pb2 import FileDescriptorProto

PROTO = Path(__file__).resolve().parents[2] / "proto" / "moemesh.proto"
HERE = Path(__file__).parent
RPC_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def generate(out: Path = HERE, proto: Path = PROTO) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{proto.parent}", f"--python_out={out}", f"--grpc_python_out={out}", proto.name]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    grpc_file = out / "moemesh_pb2_grpc.py"
    # Generated code imports its sibling as a top-level module; inside the package it must be relative.
    grpc_file.write_text(re.sub(r"^import moemesh_pb2 as", "from . import moemesh_pb2 as", grpc_file.read_text(), flags=re.M))
    return [out / "moemesh_pb2.py", grpc_file]


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def file_descriptor(directory: Path) -> FileDescriptorProto:
    """The FileDescriptorProto that `moemesh_pb2.py` in `directory` registers, read from its source (not imported,
    so two versions can be compared in one process)."""
    for call in _calls(directory / "moemesh_pb2.py"):
        if isinstance(call.func, ast.Attribute) and call.func.attr == "AddSerializedFile":
            return FileDescriptorProto.FromString(ast.literal_eval(call.args[0]))
    raise ValueError(f"{directory / 'moemesh_pb2.py'} registers no descriptor")


def grpc_methods(directory: Path) -> list[tuple[str, ...]]:
    """(kind, path, request serializer, response deserializer) of each client stub method in
    `moemesh_pb2_grpc.py`: what the services are, without the generator's version strings."""
    methods = []
    for call in _calls(directory / "moemesh_pb2_grpc.py"):
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in RPC_KINDS and ast.unparse(func.value) == "channel":
            types = {k.arg: ast.unparse(k.value) for k in call.keywords}
            methods.append((func.attr, ast.literal_eval(call.args[0]), types["request_serializer"],
                            types["response_deserializer"]))
    return sorted(methods)


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
