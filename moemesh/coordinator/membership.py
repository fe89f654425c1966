"""Who is in the cluster: workers register (protocol version and cluster name checked, names made unique),
are admitted one at a time (handshake, then profiling), answer a heartbeat every second, and are lost after
missed heartbeats or an mDNS goodbye."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from ..spec.config import ModelArgs
from ..spec.sizes import checkpoint_format
from ..transport import moemesh_pb2 as pb
from ..transport.wire import ProtocolError, address, peer_host, version_problem
from .nodes import NodeHandle


class Membership:
    def __init__(self, cluster: str, args: ModelArgs, dtype: str, me: Callable[[], pb.NodeInfo],
                 log: Callable[[str], None], joined: Callable[[NodeHandle], None],
                 lost: Callable[[NodeHandle, str], None]):
        self.cluster = cluster
        self.args = args
        self.dtype = dtype
        self.me = me  # this coordinator's NodeInfo
        self.log = log
        self.on_joined = joined  # a worker was admitted
        self.on_lost = lost  # (worker, reason): a worker is gone
        self.workers: dict[str, NodeHandle] = {}  # node id -> handle, in join order
        self.joined = asyncio.Event()  # set on each admission
        self.profiling = asyncio.Lock()

    def ready(self) -> list[NodeHandle]:
        return [w for w in self.workers.values() if w.state in ("ready", "serving")]

    def register(self, info: pb.NodeInfo, peer: str) -> pb.RegisterReply:
        """Accept or refuse a worker (`peer`: the gRPC peer it called from); an accepted one is admitted next."""
        problem = version_problem(info, f"coordinator {self.me().name}")
        if problem is None and info.cluster != self.cluster:
            problem = f"{info.name} belongs to cluster '{info.cluster}', this coordinator runs '{self.cluster}'"
        if problem:
            self.log(f"[red]refused worker[/] {info.name or info.node_id}: {problem}")
            return pb.RegisterReply(accepted=False, reason=problem, coordinator=self.me())
        known = self.workers.get(info.node_id)
        if known is not None and known.state != "lost":
            return pb.RegisterReply(accepted=True, coordinator=self.me())  # it lost track of us: fine
        taken = {w.name for w in self.workers.values() if w.node_id != info.node_id}
        name, n = info.name, 2
        while name in taken:
            name, n = f"{info.name}-{n}", n + 1
        info.name = name
        handle = NodeHandle(info, address(info.host or peer_host(peer), info.port))
        self.workers[info.node_id] = handle
        asyncio.ensure_future(self._admit(handle))
        return pb.RegisterReply(accepted=True, coordinator=self.me())

    async def _admit(self, handle: NodeHandle) -> None:
        expert_shape = (self.args.hidden_size, self.args.moe_intermediate_size or self.args.intermediate_size)
        try:
            async with self.profiling:  # one at a time: workers sharing a machine would measure each other
                await handle.admit(self.me(), self.dtype, expert_shape, checkpoint_format(self.args, self.dtype))
        except (ProtocolError, grpc.aio.AioRpcError) as e:
            handle.state = "lost"
            self.log(f"[red]could not admit[/] {handle.name}: {e}")
            return
        self.log(f"worker [bold]{handle.name}[/] joined from {handle.address} "
                 f"({handle.info.backend or 'torch'} on {handle.info.device or 'cpu'}): "
                 f"{handle.info.memory_free / 1e9:.1f} GB offered, memory {handle.memory_bandwidth / 1e9:.1f} GB/s "
                 f"(decode reads {handle.decode_bandwidth / 1e9:.1f} GB/s at {handle.decode_flops / 1e9:.0f} GFLOP/s"
                 f"{', ' + handle.cpu_isa + ' kernels' if handle.cpu_isa else ''}), "
                 f"matmul {handle.matmul_flops / 1e9:.0f} GFLOP/s, RTT {handle.rtt_s * 1e3:.2f} ms")
        self.joined.set()
        self.on_joined(handle)

    async def heartbeats(self, every_s: float, lost_after: int) -> None:
        while True:
            await asyncio.sleep(every_s)
            for w in self.ready():
                if await w.heartbeat() is None and w.missed >= lost_after:
                    self.lose(w, f"{w.name} stopped answering heartbeats")

    def lose(self, w: NodeHandle, reason: str) -> None:
        if w.state == "lost":
            return
        w.state = "lost"
        self.log(f"[red]lost worker[/] {w.name}: {reason}")
        self.on_lost(w, reason)

    async def gather(self, expect: int | None, wait: float | None) -> None:
        """Return once `expect` workers are ready (or, after `wait` seconds, once any is); without `expect`,
        `wait` seconds (default 5) after the first."""
        if expect:
            self.log(f"waiting for {expect} worker(s)...")
            deadline = time.monotonic() + wait if wait else None
            while len(self.ready()) < expect:
                self.joined.clear()
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                try:
                    await asyncio.wait_for(self.joined.wait(), timeout)
                except asyncio.TimeoutError:
                    if self.ready():
                        self.log(f"[yellow]waited {wait:.0f}s: going on with {len(self.ready())} worker(s)[/]")
                        return
                    deadline = None
            return
        self.log("waiting for workers (start `moemesh worker join` on other machines)...")
        while not self.ready():
            self.joined.clear()
            await self.joined.wait()
        await asyncio.sleep(5.0 if wait is None else wait)  # give the others a moment to join
