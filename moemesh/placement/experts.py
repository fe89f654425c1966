"""Placing one MoE layer's routed experts across the nodes of an expert-parallel group.

Loads are per-expert traffic shares (a layer's routing counts, normalized to sum to 1). A node's
`rate` is how many expert reads it does per second; its normalized load is load / rate.

Balancedness = (total load / total rate) / max over nodes of (load / rate): the time of a
perfectly balanced layer over the time of this placement. On equal nodes it is the usual
mean load / max load (DeepSeek's EPLB measures that); on unequal nodes it counts a fast node's
spare speed as imbalance, which is what the decode time sees.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

Replicas = list[list[tuple[int, float]]]  # per expert: (node index in the group, fraction of its traffic)


def balancedness(node_loads: list[float], rates: list[float]) -> float:
    worst = max(l / r for l, r in zip(node_loads, rates))
    return 1.0 if worst <= 0 else (sum(node_loads) / sum(rates)) / worst


def node_loads(replicas: Replicas, loads: list[float], n_nodes: int) -> list[float]:
    out = [0.0] * n_nodes
    for e, reps in enumerate(replicas):
        for node, frac in reps:
            out[node] += loads[e] * frac
    return out


def _water_fill(total: float, others: list[float], rates: list[float]) -> list[float]:
    """Split `total` over nodes already carrying `others` so the highest others+x / rate is lowest."""
    order = sorted(range(len(rates)), key=lambda g: others[g] / rates[g])
    level, used_rate, used_load = 0.0, 0.0, 0.0
    for k, g in enumerate(order):
        used_rate += rates[g]
        used_load += others[g]
        level = (total + used_load) / used_rate
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is None or level <= others[nxt] / rates[nxt]:
            break
    return [max(0.0, level * rates[g] - others[g]) for g in range(len(rates))]


def _pack(items: list[list[int]], loads: list[float], rates: list[float], free: list[int],
          holders: list[int], load: list[float]) -> None:
    """Heaviest item first onto the node whose load/rate stays lowest, among nodes with room.
    An item is a list of experts placed together (a routing group, or one expert)."""
    for experts in sorted(items, key=lambda it: -sum(loads[e] for e in it)):
        weight = sum(loads[e] for e in experts)
        room = [g for g in range(len(rates)) if free[g] >= len(experts)]
        if not room:  # a whole group fits nowhere: place its experts one by one
            _pack([[e] for e in experts], loads, rates, free, holders, load)
            continue
        g = min(room, key=lambda g: ((load[g] + weight) / rates[g], -rates[g]))
        for e in experts:
            holders[e] = g
        free[g] -= len(experts)
        load[g] += weight


def place_ours(loads: list[float], rates: list[float], slots: list[int], n_group: int = 1,
               redundant: int = 0, candidates: int = 8) -> Replicas:
    """Speed-aware, group-aware placement with replication of hot experts.

    1. Pack whole routing groups (single experts when there are fewer groups than nodes), heaviest
       first, onto the node whose load/rate stays lowest, within each node's `slots`: a token then
       touches at most topk_group nodes.
    2. While it lowers the maximum, trade a hot expert of the busiest node for a cold one of the
       idlest (a node whose memory is full can only be balanced this way).
    3. Up to `redundant` times: on the node with the highest load/rate, take the `candidates`
       experts carrying most of its load; add the replica that lowers the maximum most, on the
       node with free slots and the lowest load/rate; stop when none helps.
    4. An expert's traffic is split over its replicas by water-filling, i.e. what a router that
       sends each token to the least-loaded replica converges to.
    """
    n_exp, n_nodes = len(loads), len(rates)
    if sum(slots) < n_exp:
        raise ValueError(f"{n_exp} experts do not fit in {sum(slots)} slots")
    holders, free, load = [0] * n_exp, list(slots), [0.0] * n_nodes
    if 1 < n_nodes <= n_group and n_exp % n_group == 0:
        size = n_exp // n_group
        _pack([list(range(g * size, (g + 1) * size)) for g in range(n_group)], loads, rates, free, holders, load)
    else:
        _pack([[e] for e in range(n_exp)], loads, rates, free, holders, load)
    share: list[dict[int, float]] = [{holders[e]: 1.0} for e in range(n_exp)]
    on_node: list[set[int]] = [set() for _ in range(n_nodes)]
    for e in range(n_exp):
        on_node[holders[e]].add(e)

    def add_replica() -> bool:
        worst = max(range(n_nodes), key=lambda g: load[g] / rates[g])
        peak = load[worst] / rates[worst]
        hot = sorted(on_node[worst], key=lambda e: -loads[e] * share[e][worst])[:candidates]
        best = None
        for e in hot:
            targets = [t for t in range(n_nodes) if free[t] > 0 and t not in share[e]]
            if not targets or loads[e] <= 0:
                continue
            t = min(targets, key=lambda t: load[t] / rates[t])
            nodes = list(share[e]) + [t]
            others = [load[g] - loads[e] * share[e].get(g, 0.0) for g in nodes]
            x = _water_fill(loads[e], others, [rates[g] for g in nodes])
            # Judged on the nodes it changes: when several nodes tie at the peak, each is lowered in turn.
            new_peak = max((o + xi) / rates[g] for g, o, xi in zip(nodes, others, x))
            if new_peak < peak - 1e-12 and (best is None or new_peak < best[0]):
                best = (new_peak, e, nodes, others, x)
        if best is None:
            return False
        _, e, nodes, others, x = best
        free[nodes[-1]] -= 1
        on_node[nodes[-1]].add(e)
        share[e] = {g: xi / loads[e] for g, xi in zip(nodes, x)}
        for g, o, xi in zip(nodes, others, x):
            load[g] = o + xi
        return True

    def swap() -> bool:
        """Trade a hot expert of the busiest node for a cold one of the idlest (memory-capped
        nodes cannot take replicas, so they are balanced by trading)."""
        worst = max(range(n_nodes), key=lambda g: load[g] / rates[g])
        idle = min(range(n_nodes), key=lambda g: load[g] / rates[g])
        peak = load[worst] / rates[worst]
        single = [e for e in on_node[worst] if len(share[e]) == 1]  # replicated experts stay put
        hot = sorted(single, key=lambda e: -loads[e])[:candidates]
        cold = sorted((e for e in on_node[idle] if len(share[e]) == 1), key=lambda e: loads[e])[:candidates]
        best = None
        for e in hot:
            for f in cold:
                new_peak = max((load[worst] - loads[e] + loads[f]) / rates[worst],
                               (load[idle] - loads[f] + loads[e]) / rates[idle])
                if new_peak < peak - 1e-12 and (best is None or new_peak < best[0]):
                    best = (new_peak, e, f)
        if best is None:
            return False
        _, e, f = best
        for x, src, dst in ((e, worst, idle), (f, idle, worst)):
            on_node[src].remove(x)
            on_node[dst].add(x)
            share[x] = {dst: 1.0}
            load[src] -= loads[x]
            load[dst] += loads[x]
        return True

    for _ in range(n_exp):
        if not swap():
            break
    for _ in range(redundant):
        if not add_replica():
            break
    return [sorted(s.items()) for s in share]


# ---- DeepSeek EPLB, written from its published description (github.com/deepseek-ai/EPLB) --------

def _eplb_replicate(weights: list[float], n_physical: int) -> list[int]:
    """Replica counts: repeatedly give one more replica to the expert with the highest load per replica."""
    counts = [1] * len(weights)
    for _ in range(n_physical - len(weights)):
        e = max(range(len(weights)), key=lambda i: weights[i] / counts[i])
        counts[e] += 1
    return counts


def _eplb_pack(weights: list[float], n_packs: int) -> list[int]:
    """Balanced packing: items by descending weight into the lightest pack that is not full."""
    per_pack = len(weights) // n_packs
    fill, weight, pack_of = [0] * n_packs, [0.0] * n_packs, [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        p = min((p for p in range(n_packs) if fill[p] < per_pack), key=lambda p: weight[p])
        pack_of[i], fill[p], weight[p] = p, fill[p] + 1, weight[p] + weights[i]
    return pack_of


def place_eplb(loads: list[float], n_nodes: int, redundant: int = 0) -> Replicas:
    """EPLB's rebalance_experts with each of our nodes as one of its GPUs inside one of its nodes
    (its global policy): replicate, then pack equal numbers of physical experts on every node; an
    expert's traffic is split equally among its replicas. `redundant` is rounded down so every node
    gets the same number of slots, as EPLB requires.
    """
    n_exp = len(loads)
    n_physical = (n_exp + redundant) // n_nodes * n_nodes
    if n_physical < n_exp:
        raise ValueError(f"EPLB needs the {n_exp} experts to fill {n_nodes} equal nodes; add redundant slots")
    counts = _eplb_replicate(loads, n_physical)
    physical = [(e, loads[e] / c) for e, c in enumerate(counts) for _ in range(c)]
    pack_of = _eplb_pack([w for _, w in physical], n_nodes)
    replicas: Replicas = [[] for _ in range(n_exp)]
    for (e, _), node in zip(physical, pack_of):
        replicas[e].append((node, 1.0 / counts[e]))
    return [_merge(r) for r in replicas]


def _merge(reps: list[tuple[int, float]]) -> list[tuple[int, float]]:
    merged: dict[int, float] = {}
    for node, frac in reps:
        merged[node] = merged.get(node, 0.0) + frac
    return sorted(merged.items())


# ---- single-token decode ------------------------------------------------------------------------

@lru_cache(maxsize=256)
def decode_imbalance(n_nodes: int, n_experts: int, n_group: int, topk_group: int, top_k: int,
                     samples: int = 4000) -> float:
    """E[max experts one token reads on a node] / (top_k / n_nodes), for equal nodes, uniform load.

    The balanced-load figure divides a token's top_k expert reads evenly; a single token does not:
    it picks topk_group groups, then top_k experts in them, and the node with the most of them sets
    the time. Groups are laid out whole on nodes when there are at least as many groups as nodes
    (as place_ours does). Estimated once per shape by sampling with a fixed seed.
    """
    if n_nodes <= 1:
        return 1.0
    rng = np.random.default_rng(0)
    size = n_experts // n_group
    group_choice = np.argsort(rng.random((samples, n_group)), axis=1)[:, :topk_group]
    pick = np.argsort(rng.random((samples, topk_group * size)), axis=1)[:, :top_k]
    group = np.take_along_axis(group_choice, pick // size, axis=1)
    expert = group * size + pick % size
    if n_group >= n_nodes:
        node = (group * n_nodes) // n_group
    else:
        node = (expert * n_nodes) // n_experts
    counts = np.zeros((samples, n_nodes), dtype=np.int64)
    np.add.at(counts, (np.arange(samples)[:, None], node), 1)
    return float(counts.max(axis=1).mean() / (top_k / n_nodes))


def contiguous(n_experts: int, slots: list[int]) -> Replicas:
    """The load-unaware layout a runtime would use without a planner: experts in id order,
    each node taking a block proportional to its slots."""
    total = sum(slots)
    bounds = [math.floor(n_experts * sum(slots[:g + 1]) / total) for g in range(len(slots))]
    replicas: Replicas = []
    node = 0
    for e in range(n_experts):
        while e >= bounds[node]:
            node += 1
        replicas.append([(node, 1.0)])
    return replicas
