"""Shared builders for the placement tests (no tests here)."""

from __future__ import annotations

import random
from pathlib import Path

from moemesh.spec.config import args_from_dict
from moemesh.placement import Cluster, Link, Node

REPO = Path(__file__).resolve().parents[1]
REAL_CONFIG = REPO / "tests" / "data" / "deepseek-v3-671b" / "config.json"  # the published DeepSeek-V3 config.json
EXAMPLES = REPO / "examples" / "clusters"
GB = 10**9


def tiny_config(**overrides) -> dict:
    """A small DeepSeek-V3-architecture config: 8 layers (1 dense), 16 experts in 4 groups."""
    cfg = {
        "model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 8, "num_attention_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "moe_intermediate_size": 128,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    }
    cfg.update(overrides)
    return cfg


def tiny_args(**overrides):
    return args_from_dict(tiny_config(**overrides))


def node(name: str, memory: float, bandwidth: float = 100e9, compute: float = 10e12, head: bool = False) -> Node:
    return Node(name=name, memory=int(memory), bandwidth=bandwidth, compute=compute, backend="cpu", head=head)


def cluster(*nodes: Node, rtt: float = 1e-4, bandwidth: float = 1.25e9) -> Cluster:
    return Cluster(tuple(nodes), Link(rtt, bandwidth))


def zipf_loads(n: int, s: float = 1.0, seed: int = 0) -> list[float]:
    """Zipf-like expert loads (rank r gets 1/r^s), in a shuffled expert order."""
    w = [1 / (r + 1) ** s for r in range(n)]
    random.Random(seed).shuffle(w)
    total = sum(w)
    return [x / total for x in w]
