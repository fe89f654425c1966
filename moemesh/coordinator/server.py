"""The coordinator process: holds the head (embeddings, final norm, lm_head, MTP) and the tokenizer,
admits workers (version handshake, profile), plans and loads the shards, runs the scheduler, serves
generation, and re-plans when a worker joins or is lost."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from ..kernels import get_backend
from ..model.checkpoint import Checkpoint, CheckpointError, fingerprint
from ..spec.layout import split_kv_b_shapes
from ..model.engine import eos_ids
from ..model.generate import Sampling
from ..model.model import Transformer
from ..spec.routing import RoutingStats
from ..model.tokenizer import Tokenizer
from ..placement import PlacementError, Plan
from ..transport import moemesh_pb2 as pb
from ..transport import moemesh_pb2_grpc as rpc
from ..transport.discovery import Discovery
from ..transport.pipeline import StepStream
from ..transport.wire import (GRPC_OPTIONS, PROTOCOL_VERSION, ProtocolError, address, new_node_id, node_info,
                              peer_host, tensor_from, tensor_msg, version_problem)
from .nodes import NodeHandle
from .planning import make_plan, shard_specs
from ..kernels.profile import decode_bandwidth
from ..process import stop_on_signals
from .scheduler import NodeLost, Request, Scheduler, StepFailed

CHUNK = 4 << 20  # weight stream piece


@dataclass
class CoordinatorOptions:
    model: Path
    name: str = "coordinator"
    cluster: str = "default"
    host: str = "0.0.0.0"
    port: int = 7070
    expect: int | None = None  # wait for this many workers...
    wait: float | None = None  # ...at most this long; without --expect: this long after the first (default 5 s)
    dtype: str = "bfloat16"
    split: str = "auto"
    plan_file: Path | None = None
    context: int = 4096  # KV-cache headroom the plan leaves per layer, in tokens
    mdns: bool = True
    interfaces: list[str] | None = None
    step_timeout: float = 600.0
    heartbeat_s: float = 1.0
    lost_after: int = 3  # missed heartbeats


@dataclass
class UI:
    """How the coordinator tells a person what it is doing (the CLI draws progress bars)."""
    log: Callable[[str], None] = print
    load_progress: Callable[[str, str, int, int], None] = field(default=lambda node, stage, done, total: None)


class CoordinatorServer(rpc.CoordinatorServicer, rpc.PipelineServicer):
    def __init__(self, opts: CoordinatorOptions, ui: UI | None = None):
        self.opts = opts
        self.ui = ui or UI()
        self.node_id = new_node_id()
        self.ckpt = Checkpoint(opts.model)
        self.args = self.ckpt.args
        self.fingerprint = fingerprint(opts.model)
        backend = get_backend("torch", self.args, dtype=opts.dtype)
        self.head = Transformer.load(self.ckpt, backend, layers=[], head=True)
        self.tokenizer = Tokenizer.from_dir(opts.model)
        self.workers: dict[str, NodeHandle] = {}  # node id -> handle, in join order
        self.plan: Plan | None = None
        self.plan_id = 0
        self.state = "waiting"
        self.ring: StepStream | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.step_ids = itertools.count(1)
        self.hop_ms: deque[float] = deque(maxlen=2000)
        self.joined = asyncio.Event()
        self.profiling = asyncio.Lock()
        self.head_bandwidth = 0.0
        self.past_routing = RoutingStats(self.args.n_routed_experts)
        self.port = 0
        self.scheduler = Scheduler(self.head, self.tokenizer, eos_ids(Path(opts.model), self.args), self.forward,
                                   self.replan)

    def info(self) -> pb.NodeInfo:
        return node_info(self.node_id, self.opts.name, self.opts.cluster, self.port)

    # ---- workers
    async def Register(self, info: pb.NodeInfo, context) -> pb.RegisterReply:
        problem = version_problem(info, f"coordinator {self.opts.name}")
        if problem is None and info.cluster != self.opts.cluster:
            problem = f"{info.name} belongs to cluster '{info.cluster}', this coordinator runs '{self.opts.cluster}'"
        if problem:
            self.ui.log(f"[red]refused worker[/] {info.name or info.node_id}: {problem}")
            return pb.RegisterReply(accepted=False, reason=problem, coordinator=self.info())
        known = self.workers.get(info.node_id)
        if known is not None and known.state != "lost":
            return pb.RegisterReply(accepted=True, coordinator=self.info())  # it lost track of us: fine
        taken = {w.name for w in self.workers.values() if w.node_id != info.node_id}
        name, n = info.name, 2
        while name in taken:
            name, n = f"{info.name}-{n}", n + 1
        info.name = name
        handle = NodeHandle(info, address(info.host or peer_host(context.peer()), info.port))
        self.workers[info.node_id] = handle
        asyncio.ensure_future(self._admit(handle))
        return pb.RegisterReply(accepted=True, coordinator=self.info())

    async def _admit(self, handle: NodeHandle) -> None:
        try:
            a = self.args
            async with self.profiling:  # one at a time: workers sharing a machine would measure each other
                await handle.admit(self.info(), self.opts.dtype,
                                   (a.hidden_size, a.moe_intermediate_size or a.intermediate_size))
        except (ProtocolError, grpc.aio.AioRpcError) as e:
            handle.state = "lost"
            self.ui.log(f"[red]could not admit[/] {handle.name}: {e}")
            return
        self.ui.log(f"worker [bold]{handle.name}[/] joined from {handle.address}: "
                    f"{handle.info.memory_free / 1e9:.1f} GB offered, memory {handle.memory_bandwidth / 1e9:.1f} GB/s "
                    f"(decode reads {handle.decode_bandwidth / 1e9:.1f} GB/s), "
                    f"matmul {handle.matmul_flops / 1e9:.0f} GFLOP/s, RTT {handle.rtt_s * 1e3:.2f} ms")
        self.joined.set()
        if self.state == "ready":  # a node joined a running cluster: maybe a better plan
            asyncio.ensure_future(self.scheduler.exclusive(lambda: self._rebalance(f"{handle.name} joined")))

    async def _rebalance(self, reason: str) -> None:
        """Re-plan between steps; requests in flight replay from position 0 on the new shards."""
        try:
            await self.replan(reason, keep_if_same=self.state == "ready")
        except (PlacementError, ValueError, RuntimeError) as e:
            self.ui.log(f"[yellow]could not re-plan[/] ({reason}): {e}")
            return
        self.scheduler.free.clear()
        for r in self.scheduler.active:
            r.fed = 0

    def ready_workers(self) -> list[NodeHandle]:
        return [w for w in self.workers.values() if w.state in ("ready", "serving")]

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.opts.heartbeat_s)
            for w in self.ready_workers():
                if await w.heartbeat() is None and w.missed >= self.opts.lost_after:
                    self.lose(w, f"{w.name} stopped answering heartbeats")

    def lose(self, w: NodeHandle, reason: str) -> None:
        if w.state == "lost":
            return
        w.state = "lost"
        self.ui.log(f"[red]lost worker[/] {w.name}: {reason}")
        if self.plan is not None and w.name in {n for s in self.plan.stages for n in s.nodes}:
            self.state = "degraded"  # no step goes out on the broken ring
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(NodeLost(reason))
            self.pending.clear()
            asyncio.ensure_future(self.scheduler.exclusive(lambda: self._rebalance(reason)))

    # ---- planning and loading
    async def replan(self, reason: str, keep_if_same: bool = False) -> None:
        workers = self.ready_workers()
        if not workers:
            raise RuntimeError("no workers left")
        stats = await self.routing_stats()  # what the current shards saw: hot experts get replicas
        if not self.head_bandwidth:  # the head's own lm_head read speed, measured once
            a = self.args
            self.head_bandwidth = await asyncio.get_running_loop().run_in_executor(
                self.scheduler.compute, decode_bandwidth, a.hidden_size, a.moe_intermediate_size or a.intermediate_size,
                self.opts.dtype)
        plan = make_plan(self.args, workers, self.opts.dtype, self.opts.split, self.opts.context,
                         mtp=bool(self.head.mtp), stats=stats if stats.layers else None, plan_file=self.opts.plan_file,
                         head_bandwidth=self.head_bandwidth)
        if keep_if_same and self.plan is not None and _layout(plan) == _layout(self.plan):
            return
        self.state = "loading"
        self.ui.log(f"planning ({reason}): {_describe(plan)}; predicted {plan.tokens_per_s:.1f} tokens/s")
        self.plan_id += 1
        specs, first = shard_specs(plan, workers, self.plan_id, str(Path(self.opts.model).resolve()),
                                   self.fingerprint, self.opts.dtype)
        by_id = {w.node_id: w for w in workers}
        self.past_routing = stats  # the new shards start counting from zero
        results = await asyncio.gather(*(self._load(by_id[node], spec) for node, spec in specs.items()),
                                       return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        if failed:
            self.state = "waiting"
            raise RuntimeError("; ".join(failed))
        for w in workers:
            spec = specs.get(w.node_id)
            w.layers = list(spec.layers) if spec else []
            w.experts = sum(len(e.experts) for e in spec.experts) if spec else 0
            w.state = "serving" if spec else "ready"
        if self.ring is not None:
            await self.ring.close()
        self.ring = StepStream(first)
        self.plan = plan
        self.state = "ready"

    async def _load(self, w: NodeHandle, spec: pb.ShardSpec) -> None:
        async for update in w.stub.LoadShard(spec):
            if update.error:
                raise RuntimeError(update.error)
            self.ui.load_progress(w.name, update.stage, update.done, update.total)
            if update.stage == "ready":
                w.weight_bytes = update.weight_bytes

    async def FetchTensors(self, request: pb.FetchRequest, context):
        try:
            tensors = shard_tensors(self.ckpt, list(request.names))
        except CheckpointError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        total = sum(t.nbytes for t in tensors.values())
        for name, t in tensors.items():
            msg = tensor_msg(t)
            digest = hashlib.sha256(msg.data).hexdigest()
            for i in range(0, max(len(msg.data), 1), CHUNK):
                last = i + CHUNK >= len(msg.data)
                yield pb.TensorChunk(name=name, dtype=msg.dtype, shape=list(t.shape), data=msg.data[i : i + CHUNK],
                                     last=last, sha256=digest if last else "", total_bytes=total)

    async def Model(self, request: pb.Empty, context) -> pb.ModelInfo:
        path = Path(self.opts.model)

        def text(name: str) -> str:
            return (path / name).read_text() if (path / name).exists() else ""

        return pb.ModelInfo(config_json=text("config.json"), tokenizer_json=text("tokenizer.json"),
                            tokenizer_config_json=text("tokenizer_config.json"),
                            generation_config_json=text("generation_config.json"))

    # ---- the ring
    async def forward(self, segments: list[tuple[str, int, int]], x: torch.Tensor, free: list[str]) -> torch.Tensor:
        if self.ring is None or self.state != "ready":
            raise NodeLost("the cluster is not ready")
        step_id = next(self.step_ids)
        step = pb.Step(step_id=step_id, hidden=tensor_msg(x), free=free,
                       segments=[pb.Segment(request_id=r, start=s, length=n) for r, s, n in segments],
                       hops=[pb.Hop(node_id=self.node_id, sent=time.time())])
        future = asyncio.get_running_loop().create_future()
        self.pending[step_id] = future
        try:
            await self.ring.send(step)
            result: pb.Step = await asyncio.wait_for(future, self.opts.step_timeout)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            raise NodeLost(f"the ring broke ({type(e).__name__})") from None
        finally:
            self.pending.pop(step_id, None)
        arrived = time.time()
        hops = list(result.hops)
        for a, b in zip(hops, hops[1:]):
            self.hop_ms.append(1000 * (b.received - a.sent))
        self.hop_ms.append(1000 * (arrived - hops[-1].sent))
        names = {w.node_id: w for w in self.workers.values()}
        for h in hops[1:]:
            if h.node_id in names:
                busy = names[h.node_id].busy_ms
                busy.append(1000 * (h.sent - h.received))
                del busy[:-200]
        if result.error:
            raise StepFailed(result.error)
        return tensor_from(result.hidden, self.head.backend.device)

    async def Forward(self, request_iterator, context) -> None:
        """The last stage hands each finished step back here."""
        try:
            while (step := await context.read()) is not grpc.aio.EOF:
                future = self.pending.get(step.step_id)
                if future is not None and not future.done():
                    future.set_result(step)
                await context.write(pb.StepAck(step_id=step.step_id))
        except asyncio.CancelledError:
            return  # the server is stopping: the stream just ends

    # ---- serving
    async def Generate(self, request: pb.GenerateRequest, context):
        s = request.sampling
        try:
            sampling = Sampling(s.temperature, s.top_p or 1.0, s.top_k, s.seed if s.has_seed else None)
            req = Request(list(request.prompt), request.max_new_tokens or 256, sampling, list(request.stop) or None,
                          asyncio.Queue())
            self.scheduler.submit(req)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            while True:
                kind, value = await req.out.get()
                if kind == "token":
                    yield pb.GenerateReply(token=value)
                elif kind == "error":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, value)
                else:
                    yield pb.GenerateReply(done=True, finish_reason=value.finish_reason, prefill_s=value.prefill_s,
                                           decode_s=value.decode_s, prompt_tokens=value.prompt_tokens,
                                           new_tokens=value.new_tokens)
                    return
        finally:
            req.cancelled = True  # a client that leaves early stops its request

    async def Logits(self, request: pb.LogitsRequest, context) -> pb.LogitsReply:
        batch = request.batch or 1
        tokens = list(request.tokens)
        if not tokens or len(tokens) % batch:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "logits: a non-empty batch of equal-length sequences")
        length = len(tokens) // batch
        if length > self.args.max_position_embeddings or any(not 0 <= t < self.args.vocab_size for t in tokens):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "logits: sequence too long or token id out of range")
        ids = [f"logits-{next(self.step_ids)}-{i}" for i in range(batch)]
        loop = asyncio.get_running_loop()

        async def run() -> torch.Tensor:
            x = await loop.run_in_executor(self.scheduler.compute, self.head.embed, tokens)
            for attempt in range(2):
                try:
                    free, self.scheduler.free = self.scheduler.free, []
                    hidden = await self.forward([(r, 0, length) for r in ids], x, free)
                    break
                except NodeLost as e:
                    if attempt:
                        raise
                    await self.replan(str(e))
            self.scheduler.free.extend(ids)
            return await loop.run_in_executor(self.scheduler.compute, lambda: self.head.head(hidden)[1].float().cpu())

        try:
            logits = await self.scheduler.exclusive(run)
        except (NodeLost, StepFailed, RuntimeError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.LogitsReply(logits=tensor_msg(logits.view(batch, length, -1)))

    async def routing_stats(self) -> RoutingStats:
        """Tokens routed to each expert, merged over the workers (each counts the layers it leads), added to
        what earlier plans' workers counted."""
        stats = RoutingStats(self.args.n_routed_experts)
        stats.merge(self.past_routing)
        for w in self.ready_workers():
            try:
                counts = await w.stub.Routing(pb.Empty(), timeout=10)
            except grpc.aio.AioRpcError:
                continue
            stats.merge(_stats(counts, self.args.n_routed_experts))
        return stats

    async def Routing(self, request: pb.Empty, context) -> pb.RoutingCounts:
        stats = await self.routing_stats()
        reply = pb.RoutingCounts(n_routed_experts=stats.n_routed_experts)
        for layer, counts in stats.layers.items():
            reply.layers[layer].tokens.extend(counts)
        return reply

    async def Cluster(self, request: pb.Empty, context) -> pb.Status:
        hops = sorted(self.hop_ms)
        return pb.Status(
            coordinator=self.info(), model=str(self.opts.model), nodes=[w.status() for w in self.workers.values()],
            tokens_per_s=self.scheduler.tokens_per_s(), active_requests=len(self.scheduler.active),
            predicted_tokens_per_s=self.plan.tokens_per_s if self.plan else 0.0,
            plan_json=json.dumps(self.plan.to_dict()) if self.plan else "", state=self.state,
            hop_ms_median=statistics.median(hops) if hops else 0.0,
            hop_ms_p99=hops[min(len(hops) - 1, int(0.99 * len(hops)))] if hops else 0.0)


def shard_tensors(ckpt: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """What a worker without the files needs for these (Hugging Face) names, in a form its Checkpoint reads:
    each tensor as stored with its companions (FP8 block scales, affine scales and biases; experts that
    mlx-lm stacks come as rows; a kv_b_proj stored split, as its two halves)."""
    out = {}
    for name in names:
        if not ckpt.has(name) and name.endswith("kv_b_proj.weight"):
            prefix = name.removesuffix("kv_b_proj.weight")
            out |= shard_tensors(ckpt, [prefix + half for half in split_kv_b_shapes(ckpt.args)])
            continue
        if not ckpt.has(name):
            raise CheckpointError(f"{ckpt.path}: the checkpoint has no tensor '{name}'")
        stem = name.removesuffix("weight")
        out[name] = ckpt.read_raw(name).contiguous()
        for companion in ("weight_scale_inv", "scales", "biases"):
            if name.endswith("weight") and ckpt.has(stem + companion):
                out[stem + companion] = ckpt.read_raw(stem + companion).contiguous()
    return out


def _stats(counts: pb.RoutingCounts, n_routed: int) -> RoutingStats:
    stats = RoutingStats(n_routed)
    for layer, row in counts.layers.items():
        stats.add(layer, list(row.tokens))
    return stats


def _layout(plan: Plan) -> tuple:
    return (tuple((s.lead, s.start, s.end, tuple(s.helpers)) for s in plan.stages),
            tuple(tuple(tuple(n for n, _ in reps) for reps in le.replicas) for le in plan.experts))


def _describe(plan: Plan) -> str:
    parts = []
    for s in plan.stages:
        helpers = f" (+experts on {', '.join(s.helpers)})" if s.helpers else ""
        parts.append(f"{s.lead}: layers {s.start}-{s.end - 1}{helpers}")
    return "; ".join(parts)


async def run_coordinator(opts: CoordinatorOptions, ui: UI | None = None,
                          started: Callable[[CoordinatorServer], None] | None = None) -> None:
    coordinator = CoordinatorServer(opts, ui)
    ui = coordinator.ui
    server = grpc.aio.server(options=GRPC_OPTIONS)
    rpc.add_CoordinatorServicer_to_server(coordinator, server)
    rpc.add_PipelineServicer_to_server(coordinator, server)
    coordinator.port = server.add_insecure_port(address(opts.host, opts.port))
    if coordinator.port == 0:
        raise OSError(f"cannot listen on {address(opts.host, opts.port)} (port in use?)")
    await server.start()
    a = coordinator.args
    ui.log(f"coordinator [bold]{opts.name}[/] serving {opts.model} ({a.num_hidden_layers} layers, "
           f"{a.n_routed_experts} experts) on port {coordinator.port}, cluster '{opts.cluster}'")
    discovery = Discovery(opts.interfaces) if opts.mdns else None
    tasks: list[asyncio.Future] = []
    stop = stop_on_signals()
    try:
        if discovery is not None:
            await discovery.advertise(f"coordinator-{opts.name}-{coordinator.node_id}", coordinator.port, {
                "role": "coordinator", "cluster": opts.cluster, "protocol": str(PROTOCOL_VERSION),
                "node_id": coordinator.node_id, "name": opts.name})

            def gone(instance: str) -> None:  # a worker that leaves says goodbye on mDNS
                node = instance.rsplit("-", 1)[-1].split(".", 1)[0]
                if node in coordinator.workers:
                    coordinator.lose(coordinator.workers[node], "it left (mDNS goodbye)")

            discovery.watch(lambda a: a.role == "worker" and a.properties.get("cluster") == opts.cluster,
                            lambda a: None, gone)
        if started is not None:
            started(coordinator)
        starting = asyncio.ensure_future(_start(coordinator, opts))
        await asyncio.wait([starting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            ui.log("coordinator stopped")
            return
        starting.result()
        tasks = [asyncio.ensure_future(coordinator.scheduler.run()), asyncio.ensure_future(coordinator.heartbeats())]
        ui.log(f"[green]ready[/]: generate with `moemesh generate --cluster HOST:{coordinator.port} -p ...`")
        await asyncio.wait([*tasks, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        ui.log("coordinator stopped")
    finally:
        for t in tasks:
            t.cancel()
        if coordinator.ring is not None:  # end our outgoing stream first: the first stage's handler then ends
            await coordinator.ring.close()
        await server.stop(grace=1)
        if discovery is not None:
            await discovery.close()


async def _start(c: CoordinatorServer, opts: CoordinatorOptions) -> None:
    """Wait for workers, then plan and load; with too little memory, wait for more."""
    await _wait_for_workers(c, opts)
    while True:
        try:
            await c.replan("startup")
            return
        except (PlacementError, RuntimeError, ValueError) as e:
            c.ui.log(f"[yellow]cannot place the model yet:[/] {e}\nwaiting for more workers...")
            c.joined.clear()
            await c.joined.wait()


async def _wait_for_workers(c: CoordinatorServer, opts: CoordinatorOptions) -> None:
    if opts.expect:
        c.ui.log(f"waiting for {opts.expect} worker(s)...")
        deadline = time.monotonic() + opts.wait if opts.wait else None
        while len(c.ready_workers()) < opts.expect:
            c.joined.clear()
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                await asyncio.wait_for(c.joined.wait(), timeout)
            except asyncio.TimeoutError:
                if c.ready_workers():
                    c.ui.log(f"[yellow]waited {opts.wait:.0f}s: going on with {len(c.ready_workers())} worker(s)[/]")
                    return
                deadline = None
        return
    c.ui.log("waiting for workers (start `moemesh worker join` on other machines)...")
    while not c.ready_workers():
        c.joined.clear()
        await c.joined.wait()
    await asyncio.sleep(5.0 if opts.wait is None else opts.wait)  # give the others a moment to join
