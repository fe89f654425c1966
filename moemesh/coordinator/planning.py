"""From the workers that joined to what each one loads: the placement planner's view of the cluster,
the plan (the planner's optimum, an even split, or a file), and one ShardSpec per worker."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..spec.config import ModelArgs
from ..spec.routing import RoutingStats
from ..spec.sizes import checkpoint_format
from ..placement import Cluster, Link, Node, Plan, plan
from ..placement.planner import evaluate, problem
from ..placement.search import Stage
from ..transport import moemesh_pb2 as pb
from .nodes import NodeHandle

HEAD = "coordinator"  # the planner's name for this node: embeddings, final norm, lm_head, MTP
SPLITS = ("auto", "even", "even+experts")


def placement_cluster(args: ModelArgs, workers: list[NodeHandle], dtype: str, context: int, mtp: bool,
                      head_speed: tuple[float, float] = (1e10, 1e12)) -> Cluster:
    link = Link(rtt=statistics.median([w.rtt_s for w in workers]) or 1e-4,
                bandwidth=min(w.link_bandwidth for w in workers) or 1e9)
    # Plan with each node's decode path as measured on the weights it will hold (bytes/s and flop/s of one run,
    # so the time model gives back what decoding takes there), not a plain read or a square matmul.
    nodes = tuple(Node(w.name, int(w.info.memory_free), w.decode_bandwidth or w.memory_bandwidth or 1e10,
                       w.decode_flops or w.matmul_flops or 1e11, backend=w.hardware) for w in workers)
    # The coordinator holds the head and nothing else: offer the planner exactly that much memory.
    probe = Cluster((Node(HEAD, 1 << 62, *head_speed, head=True),) + nodes, link)
    need = problem(args, probe, None, context, checkpoint_format(args, dtype), mtp=mtp).tm.head_memory()
    return Cluster((Node(HEAD, need, *head_speed, head=True),) + nodes, link, name="live")


def make_plan(args: ModelArgs, workers: list[NodeHandle], dtype: str, split: str = "auto", context: int = 4096,
              mtp: bool = True, stats: RoutingStats | None = None, plan_file: Path | None = None,
              head_speed: tuple[float, float] = (1e10, 1e12)) -> Plan:
    if plan_file is not None:
        chosen = Plan.load(plan_file)
        names = {w.name for w in workers}
        unknown = sorted({n for s in chosen.stages for n in s.nodes} - names)
        if unknown:
            raise ValueError(f"{plan_file} names nodes that have not joined: {', '.join(unknown)} "
                             f"(joined: {', '.join(sorted(names))})")
        return chosen
    cluster = placement_cluster(args, workers, dtype, context, mtp, head_speed)
    quant = checkpoint_format(args, dtype)
    if split == "auto":
        return plan(args, cluster, stats, context=context, quant=quant, mtp=mtp)
    # An even split of the layers over the workers in join order (mlx-lm's rule); with "+experts" every
    # stage also spreads its routed experts over all the other workers.
    n, L = len(workers), args.num_hidden_layers
    bounds = [round(i * L / n) for i in range(n + 1)]
    stages = [Stage(w.name, a, b, tuple(o.name for o in workers if o is not w) if split == "even+experts" else ())
              for w, a, b in zip(workers, bounds, bounds[1:]) if b > a]
    p = problem(args, cluster, stats, context, quant, mtp=mtp)
    return evaluate(p, stages, strategy=split)


def shard_specs(chosen: Plan, workers: list[NodeHandle], plan_id: int, model_path: str, fingerprint: str,
                dtype: str) -> tuple[dict[str, pb.ShardSpec], str]:
    """One ShardSpec per worker that holds anything, and the address of the first stage."""
    by_name = {w.name: w for w in workers}
    specs: dict[str, pb.ShardSpec] = {}

    def spec(name: str) -> pb.ShardSpec:
        w = by_name[name]
        if w.node_id not in specs:
            specs[w.node_id] = pb.ShardSpec(plan_id=plan_id, model_path=model_path, fingerprint=fingerprint,
                                            dtype=dtype, device=w.info.device or "cpu")
        return specs[w.node_id]

    lead_of = {}
    for i, stage in enumerate(chosen.stages):
        s = spec(stage.lead)
        s.layers.extend(range(stage.start, stage.end))
        s.next_hop = by_name[chosen.stages[i + 1].lead].address if i + 1 < len(chosen.stages) else ""
        for layer in range(stage.start, stage.end):
            lead_of[layer] = stage.lead
    holdings: dict[str, dict[int, list[int]]] = {}
    for le in chosen.experts:
        lead = lead_of[le.layer]
        for e, replicas in enumerate(le.replicas):
            for node, _ in replicas:
                holdings.setdefault(node, {}).setdefault(le.layer, []).append(e)
            if any(node != lead for node, _ in replicas):
                lead_spec = spec(lead)
                lead_spec.homes.append(pb.ExpertHome(
                    layer=le.layer, expert=e, nodes=["" if node == lead else by_name[node].node_id for node, _ in replicas],
                    shares=[share for _, share in replicas]))
                for node, _ in replicas:
                    if node != lead and by_name[node].node_id not in {p.node_id for p in lead_spec.peers}:
                        lead_spec.peers.append(pb.Peer(node_id=by_name[node].node_id, address=by_name[node].address))
    for node, layers in holdings.items():
        s = spec(node)
        for layer, experts in sorted(layers.items()):
            s.experts.append(pb.LayerExperts(layer=layer, experts=sorted(experts)))
    first = by_name[chosen.stages[0].lead].address
    return specs, first
