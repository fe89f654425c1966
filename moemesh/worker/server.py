"""The worker process: a gRPC server (Worker + Pipeline services) plus the join loop — find the
coordinator (mDNS or an address), register, then do what it asks: profile, load a shard, run steps."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from ..kernels import get_backend
from ..model.checkpoint import Checkpoint, fingerprint
from ..spec.config import args_from_dict
from ..spec.layout import block_shapes, layer_prefix, mlp_shapes
from ..model.model import Transformer
from ..transport import moemesh_pb2 as pb
from ..transport import moemesh_pb2_grpc as rpc
from ..transport.discovery import Discovery
from ..transport.pipeline import StepStream
from ..transport.wire import (GRPC_OPTIONS, PROTOCOL_VERSION, ProtocolError, address, new_node_id, node_info,
                              tensor_from, tensor_msg, version_problem)
from ..process import stop_on_signals
from ..spec.units import ranges
from ..kernels.cpu_ext import cpu_isa
from ..kernels.profile import decode_profile, matmul_flops, memory_bandwidth
from .device import device_memory
from .shard import Shard


@dataclass
class WorkerOptions:
    name: str
    cluster: str = "default"
    host: str = "0.0.0.0"
    port: int = 0
    coordinator: str | None = None  # host:port; None: find it by mDNS
    mdns: bool = True
    interfaces: list[str] | None = None  # mDNS interfaces (IPv4 addresses); None: all
    memory: int | None = None  # bytes offered; None: what the OS says is available, less a margin
    fetch_weights: bool = False  # always take weights from the coordinator
    backend: str = "torch"  # torch or mlx, as `device.choose` resolved it
    device: str = "cpu"  # torch: cpu, cuda, cuda:N, mps; mlx: cpu, gpu
    cache_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "moemesh-shards")


class RemoteExperts:
    """Calls another worker's Experts RPC; `submit` returns a future of the rows, a host tensor (sync gRPC: it
    is used from the compute thread, in the middle of a layer)."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self.stub = rpc.WorkerStub(self.channel)

    def submit(self, layer: int, x: torch.Tensor, token: list[int], expert: list[int], weight: list[float]):
        call = self.stub.Experts.future(pb.ExpertBatch(layer=layer, x=tensor_msg(x), token=token, expert=expert,
                                                       weight=weight), timeout=120)
        return _Rows(call)

    def close(self) -> None:
        self.channel.close()


class _Rows:
    def __init__(self, call):
        self.call = call

    def result(self) -> torch.Tensor:
        return tensor_from(self.call.result().rows)


class WorkerServer(rpc.WorkerServicer, rpc.PipelineServicer):
    def __init__(self, opts: WorkerOptions, log=print, progress=None):
        self.opts = opts
        self.log = log
        self.progress = progress or (lambda stage, done, total: None)  # (stage, done, total): a progress bar
        self.node_id = new_node_id()
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute")  # steps and loading, in order
        self.expert_pool = ThreadPoolExecutor(1, thread_name_prefix="experts")  # other leads' expert calls
        self.shard: Shard | None = None
        self.spec: pb.ShardSpec | None = None
        self.downstream: StepStream | None = None
        self.peers: dict[str, RemoteExperts] = {}
        self.coordinator: str | None = None  # host:port, once registered
        self.last_heard = time.monotonic()
        self.port = 0
        self.refused: str | None = None

    def info(self) -> pb.NodeInfo:
        o = self.opts
        info = node_info(self.node_id, o.name, o.cluster, self.port, backend=o.backend, device=o.device,
                         memory_free=o.memory)
        gpu = device_memory(o.backend, o.device)  # a GPU holds the shard in its own memory
        if gpu is not None:
            info.memory_total = gpu[0]
            info.memory_free = gpu[1] if o.memory is None else o.memory
        if o.memory is None:
            info.memory_free = int(info.memory_free * 0.9)  # leave the OS and this process room
        return info

    # ---- Worker service
    async def Hello(self, request: pb.NodeInfo, context) -> pb.NodeInfo:
        problem = version_problem(request, f"worker {self.opts.name}")
        if problem:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        self.last_heard = time.monotonic()
        return self.info()

    async def Profile(self, request: pb.ProfileRequest, context) -> pb.ProfileReply:
        loop = asyncio.get_running_loop()
        dtype = request.dtype or "bfloat16"
        backend, device = self.opts.backend, self.opts.device  # measured where the shard will run
        bandwidth = await loop.run_in_executor(self.compute, memory_bandwidth, backend, device)
        flops = await loop.run_in_executor(self.compute, matmul_flops, dtype, backend, device)
        decode = (0.0, 0.0)
        if request.hidden and request.intermediate:  # the decode path on the weights as this node will hold them
            decode = await loop.run_in_executor(
                self.compute, lambda: decode_profile(request.hidden, request.intermediate, request.weight_format or "bf16",
                                                     request.group_size or 64, dtype, device=device, backend=backend))
        info = self.info()
        return pb.ProfileReply(memory_bandwidth=bandwidth, matmul_flops=flops, memory_total=info.memory_total,
                               memory_free=info.memory_free, decode_bandwidth=decode[0], decode_flops=decode[1],
                               cpu_isa=(cpu_isa() or "") if (backend, device) == ("torch", "cpu") else "")

    async def Echo(self, request: pb.EchoMessage, context) -> pb.EchoMessage:
        self.last_heard = time.monotonic()
        return pb.EchoMessage() if request.reply_empty else request

    async def Heartbeat(self, request: pb.Empty, context) -> pb.Health:
        self.last_heard = time.monotonic()
        model = self.shard.model if self.shard else None
        return pb.Health(time=time.time(), memory_free=self.info().memory_free,
                         kv_bytes=self.shard.kv_bytes if self.shard else 0,
                         weight_bytes=model.weight_bytes if model else 0,
                         held_bytes=self.shard.backend.held_bytes() if self.shard else 0,
                         requests=len(self.shard.caches) if self.shard else 0,
                         plan_id=self.spec.plan_id if self.spec else 0)

    async def Cache(self, request: pb.CacheRequest, context) -> pb.CacheReply:
        if self.shard is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        if request.op == pb.CacheRequest.FREE:
            self.shard.caches.pop(request.request_id, None)
            return pb.CacheReply()
        cache = self.shard.cache(request.request_id)
        if request.op == pb.CacheRequest.TRUNCATE:
            cache.truncate(request.length)
        return pb.CacheReply(length=cache.length, bytes=cache.nbytes)

    async def Experts(self, request: pb.ExpertBatch, context) -> pb.ExpertResult:
        if self.shard is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        try:
            rows = await asyncio.get_running_loop().run_in_executor(
                self.expert_pool, self.shard.serve_remote, request.layer, tensor_from(request.x), list(request.token),
                list(request.expert), list(request.weight))
        except (ValueError, ProtocolError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ExpertResult(rows=tensor_msg(rows))

    async def Routing(self, request: pb.Empty, context) -> pb.RoutingCounts:
        reply = pb.RoutingCounts()
        if self.shard is not None:
            stats = self.shard.model.routing_stats()
            reply.n_routed_experts = stats.n_routed_experts
            for layer, counts in stats.layers.items():
                reply.layers[layer].tokens.extend(counts)
        return reply

    async def LoadShard(self, spec: pb.ShardSpec, context):
        self.last_heard = time.monotonic()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.LoadProgress] = asyncio.Queue()

        def progress(what: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, pb.LoadProgress(stage="loading", done=done, total=total))

        try:
            path = Path(spec.model_path)
            if spec.fetch or self.opts.fetch_weights or not _same_model(path, spec.fingerprint):
                async for update in self._fetch(spec):
                    self.progress(update.stage, update.done, update.total)
                    yield update
                path = self._shard_dir(spec)
            task = loop.run_in_executor(self.compute, self._load, path, spec, progress)
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    update = getter.result()
                    self.progress(update.stage, update.done, update.total)
                    yield update
                else:
                    getter.cancel()
            model = task.result()
        except Exception as e:  # any failure goes back to the coordinator as words, the worker stays up
            self.log(f"[red]loading failed:[/] {e}")
            yield pb.LoadProgress(stage="error", error=f"{self.opts.name}: {e}")
            return
        await self._connect(spec, model)
        self.log(f"loaded layers {ranges(list(spec.layers)) or '-'}"
                 f"{', experts of ' + ranges([e.layer for e in spec.experts]) if spec.experts else ''}: "
                 f"{model.weight_bytes / 1e9:.2f} GB of weights")
        yield pb.LoadProgress(stage="ready", done=1, total=1, weight_bytes=model.weight_bytes)

    def _load(self, path: Path, spec: pb.ShardSpec, progress) -> Transformer:
        if spec.device and spec.device != self.opts.device:
            raise ValueError(f"asked to load onto device '{spec.device}', but this worker serves on '{self.opts.device}'")
        ckpt = Checkpoint(path)
        backend = get_backend(self.opts.backend, ckpt.args, dtype=spec.dtype or "bfloat16", device=self.opts.device)
        experts = {e.layer: list(e.experts) for e in spec.experts}
        return Transformer.load(ckpt, backend, layers=list(spec.layers), head=False, experts=experts, progress=progress)

    async def _connect(self, spec: pb.ShardSpec, model: Transformer) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers = {p.node_id: RemoteExperts(p.address) for p in spec.peers}
        homes: dict[int, dict[int, list[tuple[str, float]]]] = {}
        for h in spec.homes:
            homes.setdefault(h.layer, {})[h.expert] = list(zip(h.nodes, h.shares))
        self.shard = Shard(model, homes, {node: peer.submit for node, peer in self.peers.items()})
        self.spec = spec
        if self.downstream is not None:
            await self.downstream.close()
        self.downstream = StepStream(spec.next_hop or self.coordinator)

    def _shard_dir(self, spec: pb.ShardSpec) -> Path:
        key = hashlib.sha256(spec.fingerprint.encode() + spec.SerializeToString(deterministic=True)).hexdigest()[:16]
        return self.opts.cache_dir / key

    async def _fetch(self, spec: pb.ShardSpec):
        """Stream this shard's tensors from the coordinator into a local checkpoint, checking each sha256."""
        target = self._shard_dir(spec)
        if (target / "config.json").exists():
            return
        async with grpc.aio.insecure_channel(self.coordinator, options=GRPC_OPTIONS) as channel:
            stub = rpc.CoordinatorStub(channel)
            model = await stub.Model(pb.Empty())
            args = args_from_dict(json.loads(model.config_json))
            names = _shard_tensor_names(args, list(spec.layers), {e.layer: list(e.experts) for e in spec.experts})
            tensors, parts, digest, received = {}, [], hashlib.sha256(), 0
            async for chunk in stub.FetchTensors(pb.FetchRequest(names=names)):
                parts.append(chunk.data)
                digest.update(chunk.data)
                received += len(chunk.data)
                if chunk.last:
                    if digest.hexdigest() != chunk.sha256:
                        raise ProtocolError(f"tensor '{chunk.name}' arrived corrupted (sha256 mismatch)")
                    tensors[chunk.name] = tensor_from(pb.Tensor(dtype=chunk.dtype, shape=chunk.shape, data=b"".join(parts)))
                    parts, digest = [], hashlib.sha256()
                yield pb.LoadProgress(stage="fetching", done=received, total=chunk.total_bytes)
        tmp = target.with_name(target.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(model.config_json)
        tmp.rename(target)

    # ---- Pipeline service
    async def Forward(self, request_iterator, context) -> None:
        # Read and write on the context (not an async generator) so that a server stop that cancels this
        # stream ends it quietly.
        loop = asyncio.get_running_loop()
        try:
            while (step := await context.read()) is not grpc.aio.EOF:
                received = time.perf_counter()  # this node's clock only: the coordinator compares no clocks
                if not step.error:
                    try:
                        if self.shard is None:
                            raise ProtocolError("no shard loaded")
                        x = tensor_from(step.hidden)  # the backend takes it from the host in Shard.step
                        segments = [(s.request_id, s.start, s.length) for s in step.segments]
                        y = await loop.run_in_executor(self.compute, self.shard.step, segments, x, list(step.free))
                        step.hidden.CopyFrom(tensor_msg(y))
                    except Exception as e:  # reported to the coordinator through the ring
                        step.error = f"{self.opts.name}: {type(e).__name__}: {e}"
                step.hops.append(pb.Hop(node_id=self.node_id, busy_s=time.perf_counter() - received))
                if self.downstream is not None:
                    await self.downstream.send(step)
                await context.write(pb.StepAck(step_id=step.step_id))
        except asyncio.CancelledError:
            return  # the server is stopping: the stream just ends


def _same_model(path: Path, expected: str) -> bool:
    try:
        return path.is_dir() and fingerprint(path) == expected
    except OSError:
        return False


def _shard_tensor_names(args, layers: list[int], experts: dict[int, list[int]]) -> list[str]:
    """Names a shard needs (the coordinator adds companions such as FP8 block scales)."""
    names = []
    for layer in layers:
        names += list(block_shapes(args, layer, experts.get(layer)))
    for layer, ids in experts.items():
        if layer not in layers:
            for e in ids:
                prefix = layer_prefix(layer) + f"mlp.experts.{e}."
                names += [prefix + k for k in mlp_shapes(args.hidden_size, args.moe_intermediate_size)]
    return names


async def run_worker(opts: WorkerOptions, log=print, progress=None) -> int:
    """Serve until Ctrl-C or SIGTERM. Returns the exit status: 1 if the coordinator refused us."""
    worker = WorkerServer(opts, log, progress)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    rpc.add_WorkerServicer_to_server(worker, server)
    rpc.add_PipelineServicer_to_server(worker, server)
    worker.port = server.add_insecure_port(address(opts.host, opts.port))
    await server.start()
    log(f"worker [bold]{opts.name}[/] ({worker.node_id}) listening on port {worker.port}, cluster '{opts.cluster}', "
        f"serving with {opts.backend} on {opts.device}")
    discovery = Discovery(opts.interfaces) if opts.mdns else None
    found: asyncio.Queue[str] = asyncio.Queue()
    try:
        if discovery is not None:
            info = worker.info()
            await discovery.advertise(f"worker-{opts.name}-{worker.node_id}", worker.port, {
                "role": "worker", "cluster": opts.cluster, "protocol": str(PROTOCOL_VERSION), "node_id": worker.node_id,
                "name": opts.name, "backend": info.backend, "device": info.device,
                "memory_total": str(info.memory_total), "memory_free": str(info.memory_free)})
            if opts.coordinator is None:
                discovery.watch(lambda a: a.role == "coordinator" and a.properties.get("cluster") == opts.cluster,
                                lambda a: found.put_nowait(address(a.addresses[0], a.port)))
        joining = asyncio.ensure_future(_join_loop(worker, opts, found, log))
        stop = stop_on_signals()
        await asyncio.wait({joining, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if joining.done():
            return joining.result()
        joining.cancel()
        log("worker stopped")
        return 0
    finally:
        if worker.downstream is not None:  # end our outgoing stream first: the next stage's handler then ends
            await worker.downstream.close()
        await server.stop(grace=1)
        if discovery is not None:
            await discovery.close()  # says goodbye on mDNS
        worker.compute.shutdown(wait=False)
        worker.expert_pool.shutdown(wait=False)


async def _join_loop(worker: WorkerServer, opts: WorkerOptions, found: asyncio.Queue, log) -> int:
    """Register with the coordinator; if it goes quiet, look for it again."""
    announced = False
    retry = 0.1  # seconds; doubles up to 1: a coordinator that is starting up is joined as soon as it listens
    while True:
        if opts.coordinator:
            target = opts.coordinator
        else:
            if not announced:
                log(f"looking for a coordinator of cluster '{opts.cluster}' on the network (mDNS)...")
                announced = True
            target = await found.get()
        try:
            # A channel of its own subchannels: a shared one keeps the failed attempt's reconnect backoff (1 s and
            # more), and the retry would fail again although the coordinator now listens.
            options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(target, options=options) as channel:
                reply = await rpc.CoordinatorStub(channel).Register(worker.info(), timeout=10)
        except grpc.aio.AioRpcError as e:
            if not announced:
                log(f"coordinator {target} not reachable yet ({e.code().name}); retrying")
                announced = True
            await asyncio.sleep(retry)
            retry = min(2 * retry, 1.0)
            continue
        if not reply.accepted:
            log(f"[red]refused by the coordinator:[/] {reply.reason}")
            return 1
        worker.coordinator = target
        worker.last_heard = time.monotonic()
        log(f"joined coordinator {reply.coordinator.name} at {target}")
        announced, retry = False, 0.1
        while time.monotonic() - worker.last_heard < 15:  # it heartbeats every second
            await asyncio.sleep(1.0)
        log(f"coordinator {target} went quiet; looking again")
        if opts.coordinator is None:
            while not found.empty():
                found.get_nowait()


def serve(opts: WorkerOptions, log=print, progress=None) -> int:
    return asyncio.run(run_worker(opts, log, progress))
