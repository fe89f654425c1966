"""A trainable DeepSeek-V3 in plain torch, small and readable: MLA with q-lora and YaRN rope, a dense first
layer, MoE layers with grouped sigmoid routing over routed experts plus a shared expert, and one MTP module.
Module names follow the Hugging Face checkpoint, so `state_dict()` is the checkpoint's tensor names (the MTP
layer is `model.layers.{num_hidden_layers}`). The math is the inference engine's (moemesh.kernels.torch_backend),
written for full sequences [batch, seq, hidden] with autograd."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.torch_backend import apply_rope, rope_frequencies
from ..spec.config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)  # float32 statistics


def linear(inp: int, out: int) -> nn.Linear:
    return nn.Linear(inp, out, bias=False)


class Attention(nn.Module):
    """Multi-head latent attention, computed the straightforward way (keys and values expanded per head)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        h = a.num_attention_heads
        self.q_a_proj = linear(a.hidden_size, a.q_lora_rank)
        self.q_a_layernorm = RMSNorm(a.q_lora_rank, a.rms_norm_eps)
        self.q_b_proj = linear(a.q_lora_rank, h * a.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, a.rms_norm_eps)
        self.kv_b_proj = linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim))
        self.o_proj = linear(h * a.v_head_dim, a.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a, (b, t, _) = self.a, x.shape
        h, nope, rope = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, t, h, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, t, h, nope + a.v_head_dim)
        k_nope, v = kv.split([nope, a.v_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], a.rope_interleave)  # [b, t, h, rope]
        k_pe = apply_rope(k_pe, cos, sin, a.rope_interleave)[:, :, None].expand(b, t, h, rope)  # one key for all heads
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [b, h, t, qk_head_dim]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=a.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * a.v_head_dim))


class Mlp(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj, self.up_proj = linear(hidden, intermediate), linear(hidden, intermediate)
        self.down_proj = linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; `e_score_correction_bias` (not trained by gradients: see `Moe.balance`) only decides
    which experts are picked: the best `topk_group` groups by their top-2 sum, then top-k inside them."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.weight = nn.Parameter(torch.empty(a.n_routed_experts, a.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(a.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, hidden] -> expert ids [n, k] and their weights [n, k]."""
        a = self.a
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias
            if a.n_group > 1:
                n, per_group = x.shape[0], a.n_routed_experts // a.n_group
                group_scores = choice.view(n, a.n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)
                groups = group_scores.topk(a.topk_group, dim=-1).indices
                keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
                choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
            ids = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * a.routed_scaling_factor


class Moe(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.gate = Router(a)
        self.experts = nn.ModuleList(Mlp(a.hidden_size, a.moe_intermediate_size) for _ in range(a.n_routed_experts))
        self.shared_experts = Mlp(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
        self.load = torch.zeros(a.n_routed_experts, dtype=torch.long)  # tokens per expert in the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.gate(x)
        self.load = torch.bincount(ids.flatten(), minlength=self.a.n_routed_experts)
        out = self.shared_experts(x)
        token, slot = torch.arange(x.shape[0]).repeat_interleave(ids.shape[1]), ids.flatten()
        flat_weights = weights.flatten().to(x.dtype)
        order = slot.argsort()  # the assignments grouped by expert
        start = 0
        for e, count in enumerate(self.load.tolist()):
            if count:
                rows = order[start : start + count]
                start += count
                out = out.index_add(0, token[rows], (self.experts[e](x[token[rows]]) * flat_weights[rows, None]).to(out.dtype))
        return out.view(shape)

    @torch.no_grad()
    def balance(self, gamma: float) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3 report, 2.1.2): raise the bias of experts loaded below
        the mean by gamma, lower those above it."""
        load = self.load.float()
        self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = Moe(a) if a.is_moe_layer(layer) else Mlp(a.hidden_size, a.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """The MTP layer's own final norm; its output head is the main model's lm_head (shared in training, as in
    the report, so the checkpoint leaves `shared_head.head` out)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class MtpLayer(Block):
    """Predicts token i+2 from the main model's final normed hidden state at i and the embedding of token i+1."""

    def __init__(self, a: ModelArgs, layer: int):
        super().__init__(a, layer)
        self.enorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.hnorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.eh_proj = linear(2 * a.hidden_size, a.hidden_size)
        self.shared_head = SharedHead(a)


class Body(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList([Block(a, i) for i in range(a.num_hidden_layers)]
                                    + [MtpLayer(a, i) for i in a.mtp_layers])
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class DeepseekV3(nn.Module):
    def __init__(self, a: ModelArgs, seed: int = 0):
        super().__init__()
        if a.q_lora_rank is None or a.n_routed_experts == 0 or a.n_shared_experts == 0 or a.tie_word_embeddings:
            raise ValueError("the trainer builds the full DeepSeek-V3 block: q_lora_rank, routed and shared "
                             "experts, and an untied lm_head")
        self.a = a
        self.model = Body(a)
        self.lm_head = linear(a.hidden_size, a.vocab_size)
        inv_freq, attention_factor = rope_frequencies(a)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() > 1:  # norms start at one
                nn.init.normal_(p, std=0.02, generator=gen)
                if name.endswith(("o_proj.weight", "down_proj.weight")):  # residual writes, scaled by depth (GPT-2)
                    p.data /= (2 * (a.num_hidden_layers + 1)) ** 0.5

    @property
    def mtp(self) -> MtpLayer | None:
        return self.model.layers[-1] if self.a.num_nextn_predict_layers else None

    def moe_layers(self) -> dict[int, Moe]:
        return {i: blk.mlp for i, blk in enumerate(self.model.layers) if isinstance(blk.mlp, Moe)}

    def rope(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq  # [t, rope/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [b, t] -> main logits [b, t, vocab] (token i+1) and MTP logits [b, t-1, vocab] (token i+2)."""
        cos, sin = self.rope(ids.shape[1])
        e = self.model.embed_tokens(ids)
        x = e
        for blk in self.model.layers[: self.a.num_hidden_layers]:
            x = blk(x, cos, sin)
        h = self.model.norm(x)
        logits = self.lm_head(h)
        mtp = self.mtp
        if mtp is None:
            return logits, None
        # The MTP layer at position i sees h_i and the embedding of token i+1; position 0's embedding is zeroed,
        # as the inference engine (and vLLM) does.
        nxt = e[:, 1:].clone()
        nxt[:, 0] = 0
        y = mtp.eh_proj(torch.cat([mtp.enorm(nxt), mtp.hnorm(h[:, :-1])], dim=-1))
        y = mtp(y, cos[:-1], sin[:-1])
        return logits, self.lm_head(mtp.shared_head.norm(y))
