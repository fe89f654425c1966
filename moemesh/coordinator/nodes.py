"""Workers as the coordinator sees them: how to reach them, what they measured, what they hold."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import grpc

from ..spec.sizes import WeightFormat
from ..transport import moemesh_pb2 as pb
from ..transport import moemesh_pb2_grpc as rpc
from ..transport.wire import GRPC_OPTIONS, ProtocolError, version_problem


@dataclass
class NodeHandle:
    info: pb.NodeInfo
    address: str  # host:port of its gRPC server
    state: str = "joining"  # joining -> ready -> lost
    memory_bandwidth: float = 0.0  # bytes/s, a plain sum
    decode_bandwidth: float = 0.0  # bytes/s its decode path reads of the weights as held: the planner's bandwidth
    decode_flops: float = 0.0  # flop/s of that same measurement: the planner's compute
    matmul_flops: float = 0.0  # a square matmul in the compute dtype (shown, not planned with)
    cpu_isa: str = ""  # the CPU kernels' instruction-set level
    rtt_s: float = 0.0
    link_bandwidth: float = 0.0  # bytes/s, coordinator -> node
    weight_bytes: int = 0
    kv_bytes: int = 0
    held_bytes: int = 0  # what its backend's allocator holds (MLX arrays, CUDA memory); 0: not known (torch on CPU)
    layers: list[int] = field(default_factory=list)
    experts: int = 0
    missed: int = 0  # heartbeats in a row without an answer
    channel: grpc.aio.Channel | None = None
    stub: rpc.WorkerStub | None = None

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def hardware(self) -> str:
        """What it computes on, in the planner's words (placement.cluster.BACKENDS): mlx, cuda, mps or cpu."""
        if self.info.backend == "mlx":
            return "mlx"
        kind = self.info.device.split(":")[0]
        return kind if kind in ("cuda", "mps") else "cpu"

    def connect(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        self.stub = rpc.WorkerStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def admit(self, me: pb.NodeInfo, dtype: str, expert_shape: tuple[int, int], fmt: WeightFormat) -> None:
        """Handshake, then measure: the node's memory bandwidth, matmul speed and decode speed on weights held
        as `fmt` (it measures them), and the link's round trip and bandwidth (measured from here)."""
        self.connect()
        try:
            theirs = await self.stub.Hello(me, timeout=10)
        except grpc.aio.AioRpcError as e:
            raise ProtocolError(e.details() or str(e.code())) from None
        problem = version_problem(theirs, "this coordinator")
        if problem:
            raise ProtocolError(problem)
        hidden, intermediate = expert_shape
        profile = await self.stub.Profile(pb.ProfileRequest(dtype=dtype, hidden=hidden, intermediate=intermediate,
                                                            weight_format=fmt.name, group_size=fmt.group_size),
                                          timeout=300)
        self.memory_bandwidth, self.matmul_flops = profile.memory_bandwidth, profile.matmul_flops
        self.decode_bandwidth, self.decode_flops = profile.decode_bandwidth, profile.decode_flops
        self.cpu_isa = profile.cpu_isa
        self.info.memory_free = profile.memory_free
        rtts = []
        for _ in range(10):
            t0 = time.perf_counter()
            await self.stub.Echo(pb.EchoMessage(payload=b"x"), timeout=10)
            rtts.append(time.perf_counter() - t0)
        self.rtt_s = statistics.median(rtts)
        payload = bytes(4 << 20)
        t0 = time.perf_counter()
        await self.stub.Echo(pb.EchoMessage(payload=payload, reply_empty=True), timeout=60)
        self.link_bandwidth = len(payload) / max(time.perf_counter() - t0 - self.rtt_s, 1e-6)
        self.state = "ready"

    async def heartbeat(self) -> pb.Health | None:
        try:
            health = await self.stub.Heartbeat(pb.Empty(), timeout=2)
        except grpc.aio.AioRpcError:
            self.missed += 1
            return None
        self.missed = 0
        self.kv_bytes, self.weight_bytes, self.held_bytes = health.kv_bytes, health.weight_bytes, health.held_bytes
        return health

    def status(self, busy_ms: float = 0.0) -> pb.NodeStatus:
        """As `coordinator status` shows it; `busy_ms`: its recent compute per step (the ring times it)."""
        return pb.NodeStatus(info=self.info, state=self.state, rtt_s=self.rtt_s, link_bandwidth=self.link_bandwidth,
                             memory_bandwidth=self.memory_bandwidth, matmul_flops=self.matmul_flops,
                             decode_bandwidth=self.decode_bandwidth, decode_flops=self.decode_flops,
                             cpu_isa=self.cpu_isa,
                             weight_bytes=self.weight_bytes, kv_bytes=self.kv_bytes, layers=self.layers,
                             experts=self.experts, busy_ms=busy_ms, held_bytes=self.held_bytes)
