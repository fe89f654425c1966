"""What other systems would do with the same model and cluster, scored by the same cost model.

- equal split (mlx-lm's pipeline): every node gets the same number of layers, in file order.
- memory-proportional (exo's ring memory-weighted partitioning): layers in proportion to memory,
  largest node first.
- expert parallelism over all nodes with DeepSeek's EPLB packing (equal slots per node, equal split
  of an expert's tokens among its replicas), and the same with our packing.
- greedy first-fit in file order: the reference the exact search is tested against.
In all of them the head node holds embeddings and lm_head and leads the first stage it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cluster import Cluster, Node
from .cost import TimeModel
from .plan import Plan
from .planner import PlacementError, Problem, evaluate, plan_problem
from .search import Stage, equal_stages, head_first, proportional_stages


def greedy_stages(cluster: Cluster, tm: TimeModel) -> list[Stage] | None:
    """Each node in file order (head first) takes as many whole layers as its memory holds."""
    stages, layer = [], 0
    for node in head_first(cluster):
        free = node.memory - (tm.head_memory() if node is cluster.head else 0)
        if free < 0:
            return None
        start = layer
        while layer < tm.n_layers:
            s = tm.sizes.layers[layer]
            need = tm.lead_memory(layer) + s.n_experts * s.expert_bytes
            if need > free:
                break
            free -= need
            layer += 1
        if layer > start:
            stages.append(Stage(node.name, start, layer))
    return stages if layer == tm.n_layers else None


def all_nodes_ep(cluster: Cluster, n_layers: int) -> list[Stage]:
    """One stage: the head runs every layer's dense part, every node holds routed experts."""
    return [Stage(cluster.head.name, 0, n_layers, tuple(n.name for n in cluster.nodes if n is not cluster.head))]


@dataclass
class Row:
    strategy: str
    plan: Plan | None
    error: str = ""


def compare(p: Problem, ours: Plan | None = None) -> list[Row]:
    """Each strategy's plan, or why it does not fit."""
    L = p.tm.n_layers

    def attempt(name: str, stages, placer: str = "ours") -> Row:
        try:
            return Row(name, evaluate(p, stages, placer=placer, strategy=name))
        except PlacementError as e:
            return Row(name, None, str(e))

    rows = [attempt("equal split (mlx-lm)", equal_stages(p.cluster, L)),
            attempt("memory-proportional (exo)", proportional_stages(p.cluster, L))]
    if p.tm.has_moe and len(p.cluster.nodes) > 1:
        rows.append(attempt("EP on all nodes, EPLB packing", all_nodes_ep(p.cluster, L), "eplb"))
        rows.append(attempt("EP on all nodes, moemesh packing", all_nodes_ep(p.cluster, L)))
    if ours is None:
        try:
            ours = plan_problem(p)
        except PlacementError as e:
            rows.append(Row("moemesh plan", None, str(e)))
            return rows
    rows.append(Row("moemesh plan", ours))
    return rows
