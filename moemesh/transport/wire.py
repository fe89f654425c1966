"""Tensors and identities on the wire, and the version rule."""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid

import torch

from .. import __version__
from . import moemesh_pb2 as pb

# Bumped on any incompatible change to proto/moemesh.proto. MOEMESH_PROTOCOL_VERSION overrides it
# only so that tests can start a peer that speaks another version.
PROTOCOL_VERSION = int(os.environ.get("MOEMESH_PROTOCOL_VERSION", "2"))

MAX_MESSAGE = 1 << 30  # hidden states of long prompts and weight chunks are large
# Dead peers are found by the coordinator's heartbeats, not by HTTP/2 keepalive pings.
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
           "int32": torch.int32, "uint32": torch.uint32, "uint8": torch.uint8, "float8_e4m3fn": torch.float8_e4m3fn}
_NAMES = {v: k for k, v in _DTYPES.items()}


# grpc logs a traceback for every RPC still open when a server stops (a normal shutdown here).
logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)


class ProtocolError(RuntimeError):
    """A peer we cannot talk to (another protocol version, another cluster, a malformed message)."""


def tensor_msg(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype not in _NAMES:
        raise ProtocolError(f"cannot send a tensor of dtype {t.dtype}")
    return pb.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_from(msg: pb.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise ProtocolError(f"received a tensor of unknown dtype '{msg.dtype}'")
    shape = tuple(msg.shape)
    if len(shape) > 8 or any(d < 0 for d in shape):
        raise ProtocolError(f"received a tensor of impossible shape {list(shape)}")
    expected = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()  # Python ints: no wrap-around
    if len(msg.data) != expected:
        raise ProtocolError(f"received {len(msg.data)} bytes for a {msg.dtype} tensor of shape {list(shape)} "
                            f"({expected} expected)")
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8) if msg.data else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)


def version_problem(peer: pb.NodeInfo, me: str) -> str | None:
    """Why `peer` cannot join us, or None. Names both versions so a person knows what to upgrade."""
    if peer.protocol_version != PROTOCOL_VERSION:
        return (f"{peer.name or peer.node_id} speaks moemesh protocol {peer.protocol_version} "
                f"(moemesh {peer.software_version or '?'}), but {me} speaks protocol {PROTOCOL_VERSION} "
                f"(moemesh {__version__}): run the same moemesh version on every machine")
    return None


def new_node_id() -> str:
    return uuid.uuid4().hex[:12]


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


def memory_bytes() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        kb = {k: int(v.split()[0]) * 1024 for k, v in info.items()}
        return kb["MemTotal"], kb.get("MemAvailable", kb["MemFree"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total // 2


def node_info(node_id: str, name: str, cluster: str, port: int, backend: str = "torch", device: str = "cpu",
              memory_free: int | None = None) -> pb.NodeInfo:
    total, available = memory_bytes()
    return pb.NodeInfo(protocol_version=PROTOCOL_VERSION, node_id=node_id, name=name, cluster=cluster, backend=backend,
                       device=device, memory_total=total, memory_free=memory_free if memory_free is not None else available,
                       port=port, software_version=__version__)


def peer_host(context_peer: str) -> str:
    """The host part of a gRPC peer string: 'ipv4:198.18.0.2:5123' or 'ipv6:[::1]:5123'."""
    kind, _, rest = context_peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return rest.rsplit(":", 1)[0]


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
