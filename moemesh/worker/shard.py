"""A worker's part of the model and what it does with it: run its layers for each step (one KV cache
per request), serve routed experts it holds for other nodes' layers, and — for layers it leads whose
experts live on several nodes — send each node the tokens routed to its experts and sum the results in
the same order a single machine would."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import torch

from ..model.cache import KVCache, Segment
from ..model.model import Transformer

# (layer, x rows, token index per pair, expert per pair, weight per pair) -> future of rows [pairs, hidden]
SubmitExperts = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Future]
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
        """Run this node's layers over a step (segments: request id, first position, length)."""
        try:
            if not self.model.blocks:
                return x
            return self.model.forward(x, [Segment(self.cache(r), start, length) for r, start, length in segments])
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

    def serve_experts(self, layer: int, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
        held = self.expert_weights(layer)
        missing = sorted(set(expert.tolist()) - set(held))
        if missing:
            raise ValueError(f"layer {layer}: experts {missing} are not held on this node")
        return self.backend.expert_rows(held, x, token, expert, weight)

    def owners(self, layer: int, ids: torch.Tensor) -> list[list[str]]:
        """The node computing each (token, slot) pair: an expert's pairs split between its replicas by share,
        in token order (deterministic, so every step with the same routing does the same)."""
        homes = self.homes.get(layer, {})
        rows = ids.tolist()
        owner = [[""] * len(r) for r in rows]
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for t, r in enumerate(rows):
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

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = ids.shape
        owner = self.owners(layer, ids)
        pairs = torch.empty(n, k, x.shape[1], dtype=x.dtype, device=x.device)
        calls = []
        for node in sorted({o for row in owner for o in row} - {""}):  # remote first: they work while we do
            t_idx, slot = _select(owner, node)
            rows = torch.unique(t_idx)  # send each token's hidden state once
            local_row = torch.searchsorted(rows, t_idx)
            calls.append((t_idx, slot, self.peers[node](layer, x[rows], local_row, ids[t_idx, slot], weights[t_idx, slot])))
        t_idx, slot = _select(owner, "")
        if len(t_idx):
            pairs[t_idx, slot] = self.serve_experts(layer, x, t_idx, ids[t_idx, slot], weights[t_idx, slot])
        for t_idx, slot, future in calls:
            pairs[t_idx, slot] = future.result()
        return self.backend.combine_pairs(ids, pairs)


def _select(owner: list[list[str]], node: str) -> tuple[torch.Tensor, torch.Tensor]:
    pick = [(t, j) for t, row in enumerate(owner) for j, o in enumerate(row) if o == node]
    if not pick:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    t_idx, slot = zip(*pick)
    return torch.tensor(t_idx), torch.tensor(slot)
