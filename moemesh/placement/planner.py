"""`plan()`: the entry point. Searches stages, places experts, scores the result.

Every strategy (ours, and the baselines in strategies.py) is scored by `evaluate`, so their
predicted times are comparable: same byte accounting, same time model, same memory checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..spec.config import ModelArgs, load_args
from ..spec.routing import RoutingStats
from ..spec.sizes import WeightFormat, model_sizes, weight_format
from ..spec.units import fmt_bytes
from .cluster import Cluster, load_cluster
from .cost import TimeModel
from .experts import balancedness, contiguous, node_loads, place_eplb, place_ours
from .plan import LayerExperts, NodeUse, Plan, StagePlan
from .search import Stage, proportional_stages, search

class PlacementError(ValueError):
    """No plan fits; `shortfalls` maps node name -> bytes missing on that node."""

    def __init__(self, message: str, shortfalls: dict[str, int] | None = None):
        super().__init__(message)
        self.shortfalls = shortfalls or {}


@dataclass(frozen=True)
class Problem:
    """Everything a strategy is scored against."""

    args: ModelArgs
    cluster: Cluster
    tm: TimeModel
    loads: dict[int, list[float]]  # per MoE layer, traffic share per expert
    redundancy: float  # extra expert slots per layer, as a fraction of the experts
    quant: str

    @property
    def nodes(self):
        return {n.name: n for n in self.cluster.nodes}


def layer_loads(args: ModelArgs, stats: RoutingStats | None) -> dict[int, list[float]]:
    """Traffic share per expert for each MoE layer; uniform where the statistics say nothing."""
    E = args.n_routed_experts
    if stats is not None and stats.n_routed_experts != E:
        raise ValueError(f"routing statistics have {stats.n_routed_experts} experts per layer, "
                         f"the model has {E}")
    out = {}
    for layer in range(args.num_hidden_layers):
        if not args.is_moe_layer(layer):
            continue
        counts = stats.layers.get(layer) if stats is not None else None
        total = sum(counts) if counts else 0
        out[layer] = [c / total for c in counts] if total > 0 else [1.0 / E] * E
    return out


def problem(model: ModelArgs | str | Path, cluster: Cluster | str | Path, stats: RoutingStats | str | Path | None,
            context: int, quant: str | WeightFormat, position: int = 0, mtp: bool = True, redundancy: float = 0.1,
            group_size: int = 64, quantize_embeddings: bool = True, kv_element_bytes: int = 2) -> Problem:
    args = model if isinstance(model, ModelArgs) else load_args(model)
    cluster = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    if stats is not None and not isinstance(stats, RoutingStats):
        stats = RoutingStats.load(stats)
    if context < 0 or position < 0 or position > max(context, 0):
        raise ValueError(f"need 0 <= position ({position}) <= context ({context})")
    if not 0 <= redundancy <= 1:
        raise ValueError(f"redundancy must be in 0..1, got {redundancy}")
    fmt = quant if isinstance(quant, WeightFormat) else weight_format(
        quant, args, **({"group_size": group_size, "quantize_embeddings": quantize_embeddings}
                        if quant in ("int4", "int8") else {}))
    sizes = model_sizes(args, fmt, mtp=mtp, kv_element_bytes=kv_element_bytes)
    return Problem(args, cluster, TimeModel.build(args, sizes, context, position), layer_loads(args, stats),
                   redundancy, fmt.name)


def plan(model: ModelArgs | str | Path, cluster: Cluster | str | Path, stats: RoutingStats | str | Path | None = None,
         context: int = 8192, quant: str = "int4", position: int = 0, mtp: bool = True, redundancy: float = 0.1,
         max_group: int | None = None, **format_options) -> Plan:
    """The fastest predicted placement of `model` on `cluster` for decoding, or PlacementError.

    model: a ModelArgs or a path to config.json; cluster: a Cluster or a path to YAML/JSON;
    stats: RoutingStats (or a path) with per-layer expert counts, else uniform load;
    context: tokens of KV cache to leave room for on every layer; position: tokens already in the
    cache when timing a decode step; mtp: hold the MTP module on the head; redundancy: extra expert
    slots per layer (fraction of the experts) for replicas of hot experts when memory allows;
    max_group: largest expert-parallel group (default: as large as the search can afford).
    """
    p = problem(model, cluster, stats, context, quant, position, mtp, redundancy, **format_options)
    return plan_problem(p, max_group)


def plan_problem(p: Problem, max_group: int | None = None) -> Plan:
    check_head(p)
    found = [r for r in (search(p.cluster, p.tm, max_group), search(p.cluster, p.tm, 1)) if r is not None]
    if not found:
        raise no_fit_error(p)
    # The DP scores expert parallelism at uniform load; re-score both candidates with the real load.
    plans = [evaluate(p, r.stages, method=r.method) for r in found]
    return min(plans, key=lambda pl: pl.ms_per_token)


def check_head(p: Problem) -> None:
    head = p.cluster.head
    need = p.tm.head_memory()
    if need > head.memory:
        short = need - head.memory
        raise PlacementError(
            f"head node '{head.name}' is short by {short} bytes ({fmt_bytes(short)}): embeddings, lm_head, "
            f"MTP and its KV cache need {fmt_bytes(need)}, it has {fmt_bytes(head.memory)}", {head.name: short})


def evaluate(p: Problem, stages: list[Stage], placer: str = "ours", method: str = "", strategy: str = "moemesh",
             allow_over: bool = False) -> Plan:
    """Score `stages` on the problem: memory per node, expert placement, predicted decode time.

    placer: "ours" or "eplb" for expert-parallel stages. Raises PlacementError when a node's
    memory is exceeded (unless allow_over, used to report by how much a baseline overflows).
    """
    tm, cluster, nodes = p.tm, p.cluster, p.nodes
    head = cluster.head
    use = {n.name: NodeUse(n.name, n.backend, "unused", n.memory) for n in cluster.nodes}
    use[head.name].role = "head"
    use[head.name].weight_bytes = tm.sizes.head_bytes + tm.sizes.mtp_bytes
    use[head.name].kv_bytes = tm.head_memory() - use[head.name].weight_bytes
    use[head.name].busy_ms = 1000 * tm.head_seconds(head)
    seconds, last = tm.head_seconds(head), head.name
    stage_plans, layer_experts = [], []
    E, k = tm.n_experts, tm.top_k
    for st in stages:
        lead = nodes[st.lead]
        hop = tm.hop_seconds(cluster, last, st.lead)
        t = hop
        u = use[st.lead]
        u.role = "head+lead" if u.role == "head" else "lead"
        for layer in range(st.start, st.end):
            size = tm.sizes.layers[layer]
            dense = tm.dense_seconds(lead, layer)
            t += dense
            u.busy_ms += 1000 * dense
            u.weight_bytes += size.dense_bytes
            u.kv_bytes += tm.context * tm.sizes.kv_bytes_per_token
        moe_layers = [l for l in range(st.start, st.end) if tm.sizes.layers[l].moe]
        group = [st.lead] + list(st.helpers)
        for h in st.helpers:
            use[h].role = "experts"
        if moe_layers:
            expert_bytes = tm.sizes.layers[moe_layers[0]].expert_bytes
            slot_bytes = len(moe_layers) * expert_bytes
            slots = [min(E, max(0, use[g].memory_free) // slot_bytes) for g in group] if st.helpers else [E]
            rates = [1 / tm.expert_seconds(nodes[g]) for g in group]
            if sum(slots) < E and not allow_over:
                short = E * slot_bytes - sum(slots) * slot_bytes
                raise PlacementError(f"stage {st.start}-{st.end - 1}: the routed experts need {fmt_bytes(short)} "
                                     f"more than nodes {', '.join(group)} have free", {st.lead: short})
            redundant = max(0, min(round(E * p.redundancy), sum(slots) - E)) if st.helpers else 0
            imbalance = tm.decode_imbalance(len(group))
            ep = tm.ep_seconds(cluster, st.lead, list(st.helpers))
            cache: dict = {}
            for layer in moe_layers:
                loads = p.loads[layer]
                reps = _place(placer, loads, rates, slots, p.args.n_group, redundant, cache) if st.helpers \
                    else [[(0, 1.0)]] * E
                share = node_loads(reps, loads, len(group))
                held = [0] * len(group)
                for r in reps:
                    for g, _ in r:
                        held[g] += 1
                expert_s = [k * imbalance * share[g] / rates[g] for g in range(len(group))]
                t += max(expert_s) + ep
                for g, name in enumerate(group):
                    use[name].busy_ms += 1000 * expert_s[g]
                    use[name].weight_bytes += held[g] * expert_bytes
                    use[name].expert_slots += held[g]
                before = balancedness(node_loads(contiguous(E, slots), loads, len(group)), rates) \
                    if st.helpers else 1.0
                layer_experts.append(LayerExperts(
                    layer, [[[group[g], f] for g, f in r] for r in reps], loads,
                    balancedness(share, rates), before))
        stage_plans.append(StagePlan(st.lead, st.start, st.end, list(st.helpers), 1000 * t))
        seconds += t
        last = st.lead
    back = tm.hop_seconds(cluster, last, head.name)
    seconds += back
    over = {u.name: -u.memory_free for u in use.values() if u.memory_free < 0}
    if over and not allow_over:
        name, short = max(over.items(), key=lambda kv: kv[1])
        raise PlacementError(f"node '{name}' is short by {short} bytes ({fmt_bytes(short)})", over)
    notes = [f"node '{n}' is over its memory budget by {b} bytes ({fmt_bytes(b)})" for n, b in over.items()]
    if back:
        notes.append(f"last hop back to the head: {1000 * back:.2f} ms")
    return Plan(
        model=_model_summary(p), quant=p.quant, context=tm.context, position=tm.position,
        stages=stage_plans, nodes=list(use.values()), experts=layer_experts, ms_per_token=1000 * seconds,
        method=method, strategy=strategy, cluster=cluster.name, notes=notes)


def _place(placer: str, loads, rates, slots, n_group, redundant, cache):
    key = tuple(loads)
    if key not in cache:
        if placer == "eplb":
            reps = place_eplb(loads, len(rates), redundant)
            per_node = (len(loads) + redundant) // len(rates)  # EPLB's equal share of physical experts
            if per_node > min(slots):
                raise PlacementError(f"EPLB puts {per_node} experts per layer on every node; "
                                     f"the smallest node has room for {min(slots)}")
        else:
            reps = place_ours(loads, rates, slots, n_group, redundant)
        cache[key] = reps
    return cache[key]


def _model_summary(p: Problem) -> dict:
    a, s = p.args, p.tm.sizes
    return {
        "layers": a.num_hidden_layers, "moe_layers": sum(l.moe for l in s.layers), "experts": a.n_routed_experts,
        "top_k": a.num_experts_per_tok, "n_group": a.n_group, "topk_group": a.topk_group,
        "mtp_layers": s.mtp_layers, "weight_format": s.fmt.name, "weight_bytes": s.weight_bytes,
        "read_bytes_per_token": s.read_bytes_per_token,
    }


def no_fit_error(p: Problem) -> PlacementError:
    """Name the nodes that are short, and by how much, for the split in proportion to memory."""
    tm = p.tm
    need = tm.head_memory() + sum(tm.lead_memory(l) + s.n_experts * s.expert_bytes for l, s in enumerate(tm.sizes.layers))
    have = sum(n.memory for n in p.cluster.nodes)
    trial = evaluate(p, proportional_stages(p.cluster, tm.n_layers), allow_over=True)
    over = {u.name: -u.memory_free for u in trial.nodes if u.memory_free < 0}
    lines = [f"{n}: short by {b} bytes ({fmt_bytes(b)})" for n, b in sorted(over.items(), key=lambda kv: -kv[1])]
    if need > have:
        head = (f"the model needs {fmt_bytes(need)} ({p.quant}, {tm.context} tokens of context) but the cluster "
                f"has {fmt_bytes(have)}: short by {need - have} bytes ({fmt_bytes(need - have)}) in total")
    else:
        head = (f"the model needs {fmt_bytes(need)} of the cluster's {fmt_bytes(have)}, but no split into "
                f"contiguous layers fits")
    detail = "; with layers in proportion to memory, " + "; ".join(lines) if lines else ""
    return PlacementError(head + detail, over)
