"""The plan: what each node holds, how traffic is split, and what it predicts. Plain data, JSON.

The runtime reads `stages` (who runs which layers, in which order) and `experts` (per MoE layer,
the nodes holding each routed expert and the fraction of that expert's tokens each one should
take), and can hand measured tokens/s back to `compare_measured`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "moemesh.plan/1"


@dataclass
class StagePlan:
    lead: str
    start: int  # first layer
    end: int  # one past the last layer
    helpers: list[str] = field(default_factory=list)  # nodes holding part of the routed experts
    ms: float = 0.0  # this stage's share of one token's decode time, hop into it included

    @property
    def nodes(self) -> list[str]:
        return [self.lead] + self.helpers


@dataclass
class NodeUse:
    name: str
    backend: str
    role: str  # "head", "lead", "experts", "unused" ("head+lead" when both)
    memory_budget: int
    weight_bytes: int = 0
    kv_bytes: int = 0
    expert_slots: int = 0  # routed experts held, over all layers, replicas included
    busy_ms: float = 0.0  # per token: reading and computing on this node (waiting excluded)

    @property
    def memory_used(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def memory_free(self) -> int:
        return self.memory_budget - self.memory_used


@dataclass
class LayerExperts:
    layer: int
    # replicas[e] = [[node, fraction of expert e's tokens], ...]; fractions sum to 1
    replicas: list[list[list]]
    load: list[float]  # traffic share per expert (sums to 1); uniform without statistics
    balancedness: float  # 1.0 when the layer's experts sit on one node
    balancedness_before: float  # experts in id order, no replicas (what a runtime does unplanned)


@dataclass
class Measured:
    predicted_tokens_per_s: float
    measured_tokens_per_s: float

    @property
    def ratio(self) -> float:
        """measured / predicted: 1.0 is a perfect prediction, below 1 the model was optimistic."""
        return self.measured_tokens_per_s / self.predicted_tokens_per_s

    @property
    def error(self) -> float:
        return self.predicted_tokens_per_s / self.measured_tokens_per_s - 1

    def __str__(self) -> str:
        return (f"predicted {self.predicted_tokens_per_s:.2f} tok/s, measured {self.measured_tokens_per_s:.2f} tok/s "
                f"(prediction {self.error:+.0%} vs measured)")


@dataclass
class Plan:
    model: dict  # a summary: layers, experts, top_k, weight format, bytes
    quant: str
    context: int
    position: int
    stages: list[StagePlan]
    nodes: list[NodeUse]
    experts: list[LayerExperts]  # every MoE layer, in order
    ms_per_token: float
    method: str  # how the stages were searched
    strategy: str = "moemesh"
    cluster: str = ""
    notes: list[str] = field(default_factory=list)
    format: str = FORMAT

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token

    def node(self, name: str) -> NodeUse:
        return next(n for n in self.nodes if n.name == name)

    def layers_of(self, name: str) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.stages if s.lead == name]

    def expert_parallel_layers(self) -> list[LayerExperts]:
        return [l for l in self.experts if len({n for reps in l.replicas for n, _ in reps}) > 1]

    def balancedness(self) -> tuple[float, float] | None:
        """(before, after), averaged over the layers whose experts span several nodes."""
        spread = self.expert_parallel_layers()
        if not spread:
            return None
        return (sum(l.balancedness_before for l in spread) / len(spread),
                sum(l.balancedness for l in spread) / len(spread))

    def compare_measured(self, tokens_per_s: float) -> Measured:
        return Measured(self.tokens_per_s, tokens_per_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        for n, node in zip(d["nodes"], self.nodes):
            n["memory_used"], n["memory_free"] = node.memory_used, node.memory_free
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != FORMAT:
            raise ValueError(f"plan: expected format '{FORMAT}', got {d.get('format')!r}")
        d = dict(d)
        d.pop("tokens_per_s", None)
        d["stages"] = [StagePlan(**s) for s in d["stages"]]
        d["nodes"] = [NodeUse(**{k: v for k, v in n.items() if k not in ("memory_used", "memory_free")})
                      for n in d["nodes"]]
        d["experts"] = [LayerExperts(**l) for l in d["experts"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(_rounded(self.to_dict()), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _rounded(x):
    """Floats to 6 significant digits: shares and loads need no more, and the file stays small."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x
