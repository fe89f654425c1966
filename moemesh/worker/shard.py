"""A worker's part of the model and what it does with it: run its layers for each step (one KV cache
per request), serve routed experts it holds for other nodes' layers, and — for layers it leads whose
experts live on several nodes — send each node the tokens routed to its experts and sum the results in
the same order a single machine would.

The shard is the node's edge: what crosses the network comes in and goes out as CPU torch tensors in the
cluster's dtype (`transport.wire`), converted to and from the backend's arrays (torch on CPU or CUDA, MLX)
here, so every backend computes on its own arrays and every peer reads the same bytes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from ..model.cache import KVCache, Segment
from ..model.model import Transformer

# (layer, x rows [rows, hidden] (host), row of x per pair, expert per pair, weight per pair) -> future of host rows
# [pairs, hidden]
SubmitExperts = Callable[[int, torch.Tensor, list[int], list[int], list[float]], Future]
Homes = dict[int, dict[int, list[tuple[str, float]]]]  # layer -> expert -> [(node id, share)]; "" is here


class Shard:
    def __init__(self, model: Transformer, homes: Homes | None = None,
                 peers: dict[str, SubmitExperts] | None = None):
        self.model = model
        self.backend = model.backend
        self.homes = homes or {}
        self.peers = peers or {}
        self.caches: dict[str, KVCache] = {}
        model.dispatch = self.dispatch
        model.dispatch_layers = {layer for layer, experts in self.homes.items()
                                 if any(node for reps in experts.values() for node, _ in reps)}

    # ---- pipeline steps
    def cache(self, request_id: str) -> KVCache:
        cache = self.caches.get(request_id)
        if cache is None:
            cache = self.caches[request_id] = KVCache(self.backend, self.model.args.kv_cache_width)
        return cache

    def step(self, segments: list[tuple[str, int, int]], x: torch.Tensor, free: list[str]) -> torch.Tensor:
        """Run this node's layers over a step (segments: request id, first position, length); x and the
        result are host tensors [tokens, hidden]."""
        try:
            if not self.model.blocks or not segments:  # no layers here, or a step that only frees caches
                return x
            y = self.model.forward(self.backend.from_host(x),
                                   [Segment(self.cache(r), start, length) for r, start, length in segments])
            return self.backend.to_host(y)
        finally:
            for request_id in free:
                self.caches.pop(request_id, None)

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    # ---- expert sharding
    def expert_weights(self, layer: int) -> dict:
        block = self.model.blocks.get(layer)
        return block.ffn.experts if block is not None else self.model.held_experts[layer]

    def serve_experts(self, layer: int, x: Any, token: Any, expert: Any, weight: Any) -> Any:
        """Rows mlp_expert(x[token]) * weight per pair, on the backend's arrays."""
        held = self.expert_weights(layer)
        missing = sorted(set(self.backend.to_host(expert).tolist()) - set(held))
        if missing:
            raise ValueError(f"layer {layer}: experts {missing} are not held on this node")
        return self.backend.expert_rows(held, x, token, expert, weight)

    def serve_remote(self, layer: int, x: torch.Tensor, token: list[int], expert: list[int],
                     weight: list[float]) -> torch.Tensor:
        """serve_experts for another node's lead: host tensors and lists in, host rows out."""
        b = self.backend
        if layer not in self.model.blocks and layer not in self.model.held_experts:
            raise ValueError(f"layer {layer}: no experts of it are held on this node")
        rows = self.serve_experts(layer, b.from_host(x), b.tokens(token), b.tokens(expert),
                                  b.from_host(torch.tensor(weight, dtype=torch.float32)))
        return b.to_host(rows)

    def owners(self, layer: int, ids: list[list[int]]) -> list[list[str]]:
        """The node computing each (token, slot) pair: an expert's pairs split between its replicas by share,
        in token order (deterministic, so every step with the same routing does the same)."""
        homes = self.homes.get(layer, {})
        owner = [[""] * len(r) for r in ids]
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for t, r in enumerate(ids):
            for j, e in enumerate(r):
                by_expert.setdefault(e, []).append((t, j))
        for e, pairs in by_expert.items():
            replicas = homes.get(e, [("", 1.0)])
            bounds, total = [], 0.0
            for node, share in replicas:
                total += share
                bounds.append((node, total))
            for i, (t, j) in enumerate(pairs):
                at = (i + 0.5) / len(pairs) * total
                owner[t][j] = next(node for node, bound in bounds if at <= bound)
        return owner

    def dispatch(self, layer: int, x: Any, ids: Any, weights: Any) -> Any:
        """The routed experts' weighted sum [n, hidden] for x [n, hidden], ids and weights [n, k]: each pair's
        row computed where its expert lives (remote nodes first: they work while we do), gathered into
        [n, k, hidden] and summed as one machine sums them."""
        b = self.backend
        n, k = ids.shape
        expert_of = b.to_host(ids).tolist()
        weight_of = b.to_host(weights).float().tolist()
        owner = self.owners(layer, expert_of)
        pairs = b.empty(n * k, x.shape[1])  # row t * k + j: token t's j-th expert
        calls = []
        for node in sorted({o for row in owner for o in row} - {""}):
            picked = _select(owner, node)
            rows = sorted({t for t, _ in picked})  # each token's hidden state is sent once
            row_of = {t: i for i, t in enumerate(rows)}
            future = self.peers[node](layer, b.to_host(x[b.tokens(rows)]), [row_of[t] for t, _ in picked],
                                      [expert_of[t][j] for t, j in picked], [weight_of[t][j] for t, j in picked])
            calls.append(([t * k + j for t, j in picked], future))
        picked = _select(owner, "")
        if picked:
            flat = b.tokens([t * k + j for t, j in picked])
            pairs[flat] = self.serve_experts(layer, x, b.tokens([t for t, _ in picked]), ids.reshape(-1)[flat],
                                             weights.reshape(-1)[flat])
        for flat, future in calls:
            pairs[b.tokens(flat)] = b.from_host(future.result())
        return b.combine_pairs(ids, pairs.reshape(n, k, x.shape[1]))


def _select(owner: list[list[str]], node: str) -> list[tuple[int, int]]:
    """(token, slot) of the pairs `node` computes, in token order."""
    return [(t, j) for t, row in enumerate(owner) for j, o in enumerate(row) if o == node]
