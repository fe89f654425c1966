"""The model of decode time and memory that every strategy is scored with (docs/placement.md).

Decoding one token walks the pipeline: the head embeds it, each stage runs its layers and sends
the hidden state on, the head applies the final norm and lm_head. Each part of the work costs
max(bytes read / memory bandwidth, flops / compute) on the node doing it; each hop between two
nodes costs RTT/2 + hidden-state bytes / link bandwidth. In a stage whose routed experts are
spread over several nodes (expert parallelism), a MoE layer also pays one round trip from the
stage's lead to its expert nodes, and its expert time is that of the busiest node.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.config import ModelArgs
from .cluster import Cluster, Node
from .experts import decode_imbalance
from ..spec.sizes import ModelSizes


@dataclass(frozen=True)
class TimeModel:
    sizes: ModelSizes
    context: int  # tokens of KV cache reserved per layer (memory)
    position: int  # tokens already cached when the token is decoded (KV read, attention flops)
    attn_flops_per_cached_token: int  # per layer: MLA decode, latent attention (absorbed weights)
    n_group: int
    topk_group: int

    @classmethod
    def build(cls, args: ModelArgs, sizes: ModelSizes, context: int, position: int = 0) -> TimeModel:
        # Absorbed MLA: per head, scores over the latent + rope key, values over the latent.
        per_token = 2 * args.num_attention_heads * (2 * args.kv_lora_rank + args.qk_rope_head_dim)
        return cls(sizes, context, position, per_token, args.n_group, args.topk_group)

    @property
    def n_layers(self) -> int:
        return len(self.sizes.layers)

    @property
    def n_experts(self) -> int:
        return self.sizes.n_experts

    @property
    def has_moe(self) -> bool:
        return any(s.moe for s in self.sizes.layers)

    @property
    def top_k(self) -> int:
        return self.sizes.top_k

    def dense_seconds(self, node: Node, layer: int) -> float:
        """Attention, norms and the dense MLP or router + shared experts of one layer."""
        s = self.sizes.layers[layer]
        nbytes = s.dense_bytes + self.position * self.sizes.kv_bytes_per_token
        flops = 2 * s.dense_params + self.position * self.attn_flops_per_cached_token
        return max(nbytes / node.bandwidth, flops / node.compute)

    def expert_seconds(self, node: Node) -> float:
        """One routed expert, read once."""
        s = next((s for s in self.sizes.layers if s.moe), None)
        if s is None:
            return 0.0
        return max(s.expert_bytes / node.bandwidth, 2 * s.expert_params / node.compute)

    def head_seconds(self, node: Node) -> float:
        return max(self.sizes.head_read_bytes / node.bandwidth, 2 * self.sizes.head_params / node.compute)

    def hop_seconds(self, cluster: Cluster, a: str, b: str) -> float:
        return 0.0 if a == b else cluster.link(a, b).hop_seconds(self.sizes.hidden_bytes)

    def ep_seconds(self, cluster: Cluster, lead: str, helpers: list[str]) -> float:
        """Dispatch to the expert nodes and combine back, in parallel: one round trip per MoE layer."""
        return max((cluster.link(lead, h).rtt + 2 * self.sizes.hidden_bytes / cluster.link(lead, h).bandwidth
                    for h in helpers), default=0.0)

    def decode_imbalance(self, n_nodes: int) -> float:
        if self.n_experts == 0:
            return 1.0
        return decode_imbalance(n_nodes, self.n_experts, self.n_group, self.topk_group, self.top_k)

    def lead_memory(self, layer: int) -> int:
        """Bytes a stage's lead holds for one layer besides routed experts: weights + KV headroom."""
        return self.sizes.layers[layer].dense_bytes + self.context * self.sizes.kv_bytes_per_token

    def head_memory(self) -> int:
        """Embeddings, final norm, lm_head, MTP module and its KV headroom: always on the head node."""
        s = self.sizes
        return s.head_bytes + s.mtp_bytes + s.mtp_layers * self.context * s.kv_bytes_per_token
