"""From the workers that joined to loaded shards: choose a plan (planning.py), send each worker its
ShardSpec and follow its LoadShard progress, and stream the weights to a worker that has no copy of the
checkpoint (FetchTensors). Routing counts are gathered from the workers for the planner."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path

import grpc
import torch

from ..kernels.profile import decode_profile
from ..model.checkpoint import Checkpoint, CheckpointError, fingerprint
from ..placement import Plan
from ..spec.layout import split_kv_b_shapes
from ..spec.routing import RoutingStats
from ..spec.sizes import checkpoint_format
from ..transport import moemesh_pb2 as pb
from ..transport.wire import tensor_msg
from .nodes import NodeHandle
from .planning import make_plan, shard_specs

CHUNK = 4 << 20  # weight stream piece


class Loader:
    def __init__(self, ckpt: Checkpoint, dtype: str, split: str, context: int, plan_file: Path | None, mtp: bool,
                 compute: Executor, progress: Callable[[str, str, int, int], None]):
        self.ckpt = ckpt
        self.args = ckpt.args
        self.fingerprint = fingerprint(ckpt.path)
        self.dtype, self.split, self.context, self.plan_file, self.mtp = dtype, split, context, plan_file, mtp
        self.compute = compute  # the head's thread: measures its lm_head read speed
        self.progress = progress  # (node, stage, done, total)
        self.plan: Plan | None = None  # loaded on the workers
        self.plan_id = 0
        self.past_routing = RoutingStats(self.args.n_routed_experts)  # what earlier plans' shards counted
        self.head_speed: tuple[float, float] | None = None  # its decode path's (bytes/s, flop/s)

    async def routing_stats(self, workers: list[NodeHandle]) -> RoutingStats:
        """Tokens routed to each expert, merged over the workers (each counts the layers it leads), added to
        what earlier plans' workers counted."""
        stats = RoutingStats(self.args.n_routed_experts)
        stats.merge(self.past_routing)
        for w in workers:
            try:
                counts = await w.stub.Routing(pb.Empty(), timeout=10)
            except grpc.aio.AioRpcError:
                continue
            stats.merge(routing_from(counts, self.args.n_routed_experts))
        return stats

    async def choose(self, workers: list[NodeHandle], keep_if_same: bool) -> Plan | None:
        """The plan for these workers, fed the routing counted so far (hot experts get replicas); None when
        `keep_if_same` and it lays out the model as the loaded one does. PlacementError if it does not fit."""
        stats = await self.routing_stats(workers)
        if self.head_speed is None:  # measured once, on the weights as the head holds them
            a, fmt = self.args, checkpoint_format(self.args, self.dtype)
            self.head_speed = await asyncio.get_running_loop().run_in_executor(
                self.compute, decode_profile, a.hidden_size, a.moe_intermediate_size or a.intermediate_size,
                fmt.name, fmt.group_size, self.dtype)
        plan = make_plan(self.args, workers, self.dtype, self.split, self.context, mtp=self.mtp,
                         stats=stats if stats.layers else None, plan_file=self.plan_file,
                         head_speed=self.head_speed)
        if keep_if_same and self.plan is not None and _layout(plan) == _layout(self.plan):
            return None
        self.past_routing = stats  # the new shards start counting from zero
        return plan

    async def load(self, plan: Plan, workers: list[NodeHandle]) -> str:
        """Load `plan` on the workers (RuntimeError naming each failure); returns the first stage's address."""
        self.plan_id += 1
        specs, first = shard_specs(plan, workers, self.plan_id, str(self.ckpt.path.resolve()),
                                   self.fingerprint, self.dtype)
        by_id = {w.node_id: w for w in workers}
        results = await asyncio.gather(*(self._load(by_id[node], spec) for node, spec in specs.items()),
                                       return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError("; ".join(failed))
        for w in workers:
            spec = specs.get(w.node_id)
            w.layers = list(spec.layers) if spec else []
            w.experts = sum(len(e.experts) for e in spec.experts) if spec else 0
            w.state = "serving" if spec else "ready"
        self.plan = plan
        return first

    async def _load(self, w: NodeHandle, spec: pb.ShardSpec) -> None:
        async for update in w.stub.LoadShard(spec):
            if update.error:
                raise RuntimeError(update.error)
            self.progress(w.name, update.stage, update.done, update.total)
            if update.stage == "ready":
                w.weight_bytes = update.weight_bytes

    def chunks(self, names: list[str]) -> Iterator[pb.TensorChunk]:
        """These tensors (and their companions) in CHUNK-sized pieces, the last of each with its sha256.
        Raises CheckpointError, before any piece, for a tensor the checkpoint lacks."""
        return _pieces(shard_tensors(self.ckpt, names))


def _pieces(tensors: dict[str, torch.Tensor]) -> Iterator[pb.TensorChunk]:
    total = sum(t.nbytes for t in tensors.values())
    for name, t in tensors.items():
        msg = tensor_msg(t)
        digest = hashlib.sha256(msg.data).hexdigest()
        for i in range(0, max(len(msg.data), 1), CHUNK):
            last = i + CHUNK >= len(msg.data)
            yield pb.TensorChunk(name=name, dtype=msg.dtype, shape=list(t.shape), data=msg.data[i : i + CHUNK],
                                 last=last, sha256=digest if last else "", total_bytes=total)


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


def routing_from(counts: pb.RoutingCounts, n_routed: int) -> RoutingStats:
    stats = RoutingStats(n_routed)
    for layer, row in counts.layers.items():
        stats.add(layer, list(row.tokens))
    return stats


def describe(plan: Plan) -> str:
    parts = []
    for s in plan.stages:
        helpers = f" (+experts on {', '.join(s.helpers)})" if s.helpers else ""
        parts.append(f"{s.lead}: layers {s.start}-{s.end - 1}{helpers}")
    return "; ".join(parts)


def _layout(plan: Plan) -> tuple:
    return (tuple((s.lead, s.start, s.end, tuple(s.helpers)) for s in plan.stages),
            tuple(tuple(tuple(n for n, _ in reps) for reps in le.replicas) for le in plan.experts))
