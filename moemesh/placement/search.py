"""Choosing stages: which nodes, in which order, hold which contiguous layers (exactly, by DP).

A stage is a contiguous range of layers run by one lead node (attention, dense MLP, router, shared
experts, KV cache); its routed experts live on the lead alone or are spread over the lead and
helper nodes (an expert-parallel group). The token visits the head, every stage's lead in order,
and the head again.

Exactness: nodes with the same memory, bandwidth, compute and backend and no link of their own
are interchangeable, so the DP runs over *how many* nodes of each such class are used rather than
which: state = (layers placed, nodes used per class, class of the last lead), with all layer
boundaries of the next stage tried at once as a min-plus product. That is exact over node order,
layer boundaries, leaving nodes out and (up to `max_group` nodes) expert-parallel groups, with
the DP's expert term computed for uniform expert load (the final plan re-scores with the real
load). With many distinct nodes the state space grows as 2^n: `max_group` is lowered until the
work fits, and past ~10 distinct nodes the search falls back to one fixed order (head first, then
by bandwidth), exact over boundaries and skipped nodes for that order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .cluster import Cluster, Node
from .cost import TimeModel

WORK_LIMIT = 60_000  # min-plus products (61x61 each) the exact search may do: ~0.5 s
# Among splits of equal time (equal nodes), prefer even memory use: a 1 ns * (used/budget)^2 tie-break.
TIE_BREAK_S = 1e-9


@dataclass(frozen=True)
class Stage:
    lead: str
    start: int  # first layer
    end: int  # one past the last layer
    helpers: tuple[str, ...] = ()  # nodes holding part of the stage's routed experts

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.lead,) + self.helpers


@dataclass(frozen=True)
class SearchResult:
    stages: list[Stage]
    seconds: float  # the DP's own estimate (uniform expert load)
    method: str


def node_classes(cluster: Cluster) -> list[list[Node]]:
    """Interchangeable nodes grouped; the head is always a class of its own, listed first."""
    linked = {n for pair in cluster.links for n in pair}
    classes: dict[tuple, list[Node]] = {}
    head = cluster.head
    for n in cluster.nodes:
        key = ("head",) if n is head else (n.name,) if n.name in linked else (n.memory, n.bandwidth, n.compute, n.backend)
        classes.setdefault(key, []).append(n)
    return sorted(classes.values(), key=lambda c: c[0] is not head)


class _Matrices:
    """Stage time [i, j] (layers i..j-1) for a lead and helpers; inf where it does not fit."""

    def __init__(self, tm: TimeModel, cluster: Cluster):
        self.tm, self.cluster = tm, cluster
        L = tm.n_layers
        sizes = tm.sizes.layers
        self.i = np.arange(L + 1)[:, None]
        self.j = np.arange(L + 1)[None, :]
        self.valid = self.j > self.i
        self.n_moe = self._span(np.array([s.moe for s in sizes], dtype=float))
        self.lead_mem = self._span(np.array([tm.lead_memory(l) for l in range(L)], dtype=float))
        self.expert_bytes = max((s.expert_bytes for s in sizes), default=0)
        self.experts_mem = self.n_moe * tm.n_experts * self.expert_bytes
        self.head_extra = tm.head_memory()
        self.head = cluster.head.name

    def _span(self, per_layer: np.ndarray) -> np.ndarray:
        prefix = np.concatenate([[0.0], np.cumsum(per_layer)])
        return prefix[None, :] - prefix[:, None]

    def dense(self, node: Node) -> np.ndarray:
        return self._span(np.array([self.tm.dense_seconds(node, l) for l in range(self.tm.n_layers)]))

    def single(self, node: Node) -> np.ndarray:
        tm = self.tm
        t = self.dense(node) + self.n_moe * tm.top_k * tm.expert_seconds(node)
        mem = self.lead_mem + self.experts_mem + (self.head_extra if node.name == self.head else 0)
        return np.where(self.valid & (mem <= node.memory), t + TIE_BREAK_S * (mem / node.memory) ** 2, np.inf)

    def group(self, lead: Node, helpers: list[tuple[Node, int]]) -> np.ndarray:
        """Lead plus helper classes (node, count): experts shared in proportion to speed, within
        each node's memory (water-filling), at the single-token imbalance of the group size."""
        tm = self.tm
        E = tm.n_experts
        with np.errstate(divide="ignore", invalid="ignore"):
            slot_bytes = self.n_moe * self.expert_bytes  # one expert slot in every MoE layer of the range
            lead_free = lead.memory - self.lead_mem - (self.head_extra if lead.name == self.head else 0)
            caps = [np.clip(np.floor(lead_free / slot_bytes), 0, E) / E]
            caps += [np.clip(np.floor(h.memory / slot_bytes), 0, E) / E for h, _ in helpers]
        mult = [1] + [c for _, c in helpers]
        rate = [1 / tm.expert_seconds(lead)] + [1 / tm.expert_seconds(h) for h, _ in helpers]
        caps = [np.nan_to_num(c) for c in caps]
        fits = self.valid & (self.n_moe > 0) & (lead_free >= 0) & (sum(m * c for m, c in zip(mult, caps)) >= 1)
        capped = [np.zeros_like(caps[0], dtype=bool) for _ in caps]
        level = np.zeros_like(caps[0])
        for _ in caps:  # water-filling: share = min(cap, level * rate), shares sum to 1
            rest = 1 - sum(m * np.where(cp, c, 0) for m, c, cp in zip(mult, caps, capped))
            speed = sum(m * np.where(cp, 0, r) for m, r, cp in zip(mult, rate, capped))
            with np.errstate(divide="ignore", invalid="ignore"):
                level = np.where(speed > 0, rest / speed, level)
            capped = [cp | (c < level * r) for c, r, cp in zip(caps, rate, capped)]
        n_nodes = sum(mult)
        per_layer = tm.top_k * tm.decode_imbalance(n_nodes) * level
        per_layer += tm.ep_seconds(self.cluster, lead.name, [h.name for h, _ in helpers])
        return np.where(fits, self.dense(lead) + self.n_moe * per_layer, np.inf)


def _groups(counts: list[int], head_class: int, max_group: int):
    """(lead class, helper counts per class) with at most max_group nodes; the head never helps."""
    ranges = [range(1 if c == head_class else n + 1) for c, n in enumerate(counts)]
    for lead in range(len(counts)):
        for helpers in itertools.product(*ranges):
            size = 1 + sum(helpers)
            if size <= max_group and helpers[lead] + 1 <= counts[lead]:
                yield lead, helpers


def _work(counts: list[int], head_class: int, max_group: int) -> int:
    """Upper bound on min-plus products of the exact search."""
    states = math.prod(n + 1 for n in counts) * len(counts)
    return states * sum(1 for _ in _groups(counts, head_class, max_group))


def search(cluster: Cluster, tm: TimeModel, max_group: int | None = None) -> SearchResult | None:
    """The stages with the least predicted decode time per token, or None when nothing fits."""
    classes = node_classes(cluster)
    counts = [len(c) for c in classes]
    limit = len(cluster.nodes) if max_group is None else max_group
    while limit > 1 and _work(counts, 0, limit) > WORK_LIMIT:
        limit -= 1
    if _work(counts, 0, limit) > WORK_LIMIT:
        return _search_fixed_order(cluster, tm)
    return _search_classes(cluster, tm, classes, limit)


def _search_classes(cluster: Cluster, tm: TimeModel, classes: list[list[Node]], max_group: int) -> SearchResult | None:
    L, mats = tm.n_layers, _Matrices(tm, cluster)
    counts = [len(c) for c in classes]
    rep = [c[0] for c in classes]
    # Two nodes of one class have no link of their own: the default link joins them.
    hop = [[0.0 if a == b == 0 else tm.hop_seconds(cluster, rep[a].name, classes[b][a == b].name)
            if len(classes[b]) > (a == b) else np.inf for b in range(len(classes))] for a in range(len(classes))]
    cost: dict[tuple, np.ndarray] = {}
    for lead, helpers in _groups(counts, 0, max_group):
        if sum(helpers) == 0:
            m = mats.single(rep[lead])
        elif not tm.has_moe:
            continue
        else:
            m = mats.group(rep[lead], [(rep[c], n) for c, n in enumerate(helpers) if n])
        if np.isfinite(m).any():
            cost[(lead, helpers)] = m

    start = (tuple([0] * len(counts)), 0)
    best = {start: np.where(np.arange(L + 1) == 0, 0.0, np.inf)}
    back: dict[tuple, tuple] = {}  # state -> per end layer j: previous state id, start layer, stage
    order = [start]
    index = {start: 0}
    # Every stage adds at least one node, so states taken by number of nodes used come after all
    # states that lead to them.
    by_size: list[list[tuple]] = [[] for _ in range(sum(counts) + 1)]
    by_size[0].append(start)
    for bucket in by_size:
        for state in bucket:
            used, last = state
            vec = best[state]
            if not np.isfinite(vec).any():
                continue
            for (lead, helpers), m in cost.items():
                if lead == 0 and state != start:
                    continue  # the head leads the first stage or none
                add = list(helpers)
                add[lead] += 1
                new_used = tuple(u + a for u, a in zip(used, add))
                if any(u > n for u, n in zip(new_used, counts)):
                    continue
                total = vec[:, None] + m
                arg_i = np.argmin(total, axis=0)
                cand = total[arg_i, np.arange(L + 1)] + hop[last][lead]
                key = (new_used, lead, helpers)
                new_state = (new_used, lead)
                if new_state not in best:
                    best[new_state] = np.full(L + 1, np.inf)
                    back[new_state] = (np.full(L + 1, -1), np.zeros(L + 1, dtype=int), [None] * (L + 1))
                    index[new_state] = len(order)
                    order.append(new_state)
                    by_size[sum(new_used)].append(new_state)
                better = cand < best[new_state]
                if better.any():
                    best[new_state] = np.where(better, cand, best[new_state])
                    prev, starts, groups = back[new_state]
                    prev[better] = index[state]
                    starts[better] = arg_i[better]
                    for j in np.flatnonzero(better):
                        groups[j] = key

    final = None
    for state in order:
        if state == start or not np.isfinite(best[state][L]):
            continue
        t = best[state][L] + hop[state[1]][0] + tm.head_seconds(rep[0])
        if final is None or t < final[0]:
            final = (t, state)
    if final is None:
        return None
    # Walk back through the DP, then hand out concrete nodes of each class in file order.
    spans = []
    state, j = final[1], L
    while state != start:
        prev, starts, groups = back[state]
        spans.append((int(starts[j]), j, groups[j]))
        state, j = order[prev[j]], int(starts[j])
    pool = [list(c) for c in classes]
    stages = []
    for i, j, (_, lead, helpers) in reversed(spans):
        lead_node = pool[lead].pop(0).name
        helper_nodes = tuple(pool[c].pop(0).name for c, n in enumerate(helpers) for _ in range(n))
        stages.append(Stage(lead_node, i, j, helper_nodes))
    method = f"exact over node order and layer ranges ({len(cluster.nodes)} nodes in {len(classes)} classes"
    method += f", expert-parallel groups of up to {max_group} nodes)" if max_group > 1 else ", no expert-parallel groups)"
    return SearchResult(stages, float(final[0]), method)


def _search_fixed_order(cluster: Cluster, tm: TimeModel) -> SearchResult | None:
    """Many distinct nodes: head first, the rest by descending bandwidth; single-node stages;
    exact over layer boundaries and which nodes to skip for that order."""
    head = cluster.head
    nodes = [head] + sorted((n for n in cluster.nodes if n is not head), key=lambda n: (-n.bandwidth, n.name))
    L, mats = tm.n_layers, _Matrices(tm, cluster)
    cost = [mats.single(n) for n in nodes]
    # best[p][l]: layers 0..l-1 placed, node p leads the last stage; p = -1 is the head before any stage.
    best = {-1: np.where(np.arange(L + 1) == 0, 0.0, np.inf)}
    back: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for q, node in enumerate(nodes):
        cands = []
        for p in range(-1, q):
            if p not in best:
                continue
            h = tm.hop_seconds(cluster, (head if p < 0 else nodes[p]).name, node.name)
            total = best[p][:, None] + cost[q]
            arg_i = np.argmin(total, axis=0)
            cands.append((total[arg_i, np.arange(L + 1)] + h, p, arg_i))
        vec = np.full(L + 1, np.inf)
        prev = np.full(L + 1, -2)
        starts = np.zeros(L + 1, dtype=int)
        for cand, p, arg_i in cands:
            better = cand < vec
            vec = np.where(better, cand, vec)
            prev[better], starts[better] = p, arg_i[better]
        best[q], back[q] = vec, (prev, starts)
    final = None
    for q in range(len(nodes)):
        if np.isfinite(best[q][L]):
            t = best[q][L] + tm.hop_seconds(cluster, nodes[q].name, head.name) + tm.head_seconds(head)
            if final is None or t < final[0]:
                final = (t, q)
    if final is None:
        return None
    stages, q, j = [], final[1], L
    while q >= 0:
        prev, starts = back[q]
        stages.append(Stage(nodes[q].name, int(starts[j]), j))
        q, j = int(prev[j]), int(starts[j])
    return SearchResult(stages[::-1], float(final[0]),
                        f"fixed order (head, then by bandwidth) over {len(nodes)} nodes, exact layer ranges")


# ---- simple splits (the baselines in strategies.py; no_fit_error's trial split) ----

def head_first(cluster: Cluster, key=None) -> list[Node]:
    rest = [n for n in cluster.nodes if n is not cluster.head]
    return [cluster.head] + (sorted(rest, key=key) if key else rest)


def stages_of(nodes: list[Node], bounds: list[int]) -> list[Stage]:
    return [Stage(n.name, a, b) for n, a, b in zip(nodes, bounds, bounds[1:]) if b > a]


def equal_stages(cluster: Cluster, n_layers: int) -> list[Stage]:
    nodes = head_first(cluster)
    per, extra = divmod(n_layers, len(nodes))
    bounds = [0]
    for i in range(len(nodes)):
        bounds.append(bounds[-1] + per + (i < extra))
    return stages_of(nodes, bounds)


def proportional_stages(cluster: Cluster, n_layers: int) -> list[Stage]:
    nodes = head_first(cluster, key=lambda n: -n.memory)
    total = sum(n.memory for n in nodes)
    bounds, seen = [0], 0
    for n in nodes:
        seen += n.memory
        bounds.append(n_layers if n is nodes[-1] else int(round(seen / total, 5) * n_layers))
    return stages_of(nodes, bounds)
