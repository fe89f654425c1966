"""Routing-load statistics: how many tokens each routed expert of each MoE layer received.

The engine adds counts every forward step; the placement planner reads them back from JSON to
balance and replicate experts. Pure Python so the planner can load them without torch.

JSON layout (`format` is checked on load):
    {"format": "moemesh.routing/1", "n_routed_experts": 256, "tokens": 12345,
     "layers": {"3": [c0, c1, ...], "4": [...], ...}}
`tokens` counts tokens seen (each token is routed to num_experts_per_tok experts, so a layer's
counts sum to tokens * top_k); `layers` is keyed by the absolute layer index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "moemesh.routing/1"


@dataclass
class RoutingStats:
    n_routed_experts: int
    layers: dict[int, list[int]] = field(default_factory=dict)
    tokens: int = 0

    def add(self, layer: int, counts: list[int]) -> None:
        if len(counts) != self.n_routed_experts:
            raise ValueError(f"layer {layer}: {len(counts)} expert counts, expected {self.n_routed_experts}")
        row = self.layers.setdefault(layer, [0] * self.n_routed_experts)
        for e, c in enumerate(counts):
            row[e] += int(c)

    def merge(self, other: RoutingStats) -> None:
        """Add another node's counts (each node records only the layers it runs)."""
        for layer, counts in other.layers.items():
            self.add(layer, counts)
        self.tokens = max(self.tokens, other.tokens)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "n_routed_experts": self.n_routed_experts,
            "tokens": self.tokens,
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> RoutingStats:
        if d.get("format") != FORMAT:
            raise ValueError(f"routing statistics: expected format '{FORMAT}', got {d.get('format')!r}")
        n = int(d["n_routed_experts"])
        stats = cls(n_routed_experts=n, tokens=int(d.get("tokens", 0)))
        for key, counts in d["layers"].items():
            stats.add(int(key), counts)
        return stats

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        return cls.from_dict(json.loads(Path(path).read_text()))
