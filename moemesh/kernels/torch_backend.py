"""The torch backend: DeepSeek-V3 math on torch tensors, on CPU or CUDA.

Activations are 2-D [tokens, hidden]: one forward step carries the new tokens of one or more
requests back to back (`Step.segments`), so linear layers and experts run once per step over all of
them while attention reads each request's own KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import ModelArgs
from .base import AttentionWeights, MlpWeights, MoeWeights
from .fp8 import Fp8Weight, dequantize, fp8_linear

Weight = torch.Tensor | Fp8Weight
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Step:
    """What attention needs to know about one forward step."""
    segments: list  # model.cache.Segment: (cache, start, length) per request, in token order
    cos: torch.Tensor  # [tokens, rope/2] float32, attention factor applied
    sin: torch.Tensor


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope/2] and the cos/sin multiplier, plain or YaRN (as transformers computes them)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    y = args.rope_scaling
    if y is None:
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if y.attention_factor is not None:
        attention_factor = float(y.attention_factor)
    elif y.mscale and y.mscale_all_dim:
        attention_factor = mscale(y.factor, y.mscale) / mscale(y.factor, y.mscale_all_dim)
    else:
        attention_factor = mscale(y.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp  # 1 keeps the original frequency (high-frequency dims), 0 interpolates
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x. Interleaved checkpoints pair (0,1),(2,3)...; others pair (i, i+d/2). Either way
    the result is laid out as [rotated firsts | rotated seconds]; q and k share the layout. The math runs in
    x's dtype with cos/sin rounded to it, as the reference does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TorchBackend:
    name = "torch"

    def __init__(self, args: ModelArgs, dtype: str = "bfloat16", device: str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not supported by the torch backend; choose {', '.join(DTYPES)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU")
        self.args = args
        self.dtype = DTYPES[dtype]
        self.element_size = torch.tensor([], dtype=self.dtype).element_size()
        inv_freq, self.rope_factor = rope_frequencies(args)
        self.inv_freq = inv_freq.to(self.device)
        self._cos = self._sin = torch.empty(0, args.qk_rope_head_dim // 2, device=self.device)

    # ---- weights: checkpoint tensors (CPU) -> this backend's resident form
    def linear_weight(self, weight: torch.Tensor, scale_inv: torch.Tensor | None) -> Weight:
        """Dense weights take the compute dtype; FP8 weights stay FP8 with their block scales."""
        if scale_inv is not None:
            assert self.args.fp8_block is not None
            return Fp8Weight(weight.to(self.device), scale_inv.to(self.device), self.args.fp8_block)
        return weight.to(self.device, self.dtype)

    def vector(self, t: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        return t.to(self.device, torch.float32 if fp32 else self.dtype)

    def absorbed_kv_b(self, weight: torch.Tensor, scale_inv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Split kv_b_proj [heads*(nope+v), kv_lora] into W_UK [heads, nope, kv_lora] and W_UV [heads, kv_lora, v].
        These stay in the compute dtype (the absorbed products need them per head; ~0.15% of a layer's weights)."""
        a = self.args
        if scale_inv is not None:
            weight = dequantize(Fp8Weight(weight, scale_inv, a.fp8_block), torch.float32)
        w = weight.to(self.dtype).view(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        w_uk = w[:, : a.qk_nope_head_dim].contiguous().to(self.device)
        w_uv = w[:, a.qk_nope_head_dim :].transpose(1, 2).contiguous().to(self.device)
        return w_uk, w_uv

    # ---- arrays
    def tokens(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def empty(self, rows: int, width: int) -> torch.Tensor:
        return torch.empty(rows, width, dtype=self.dtype, device=self.device)

    def concat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=-1)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def step(self, segments: list) -> Step:
        end = max(s.start + s.length for s in segments)
        if end > self._cos.shape[0]:
            positions = torch.arange(max(end, 2 * self._cos.shape[0]), device=self.device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq)
            self._cos, self._sin = freqs.cos() * self.rope_factor, freqs.sin() * self.rope_factor
        if len(segments) == 1:
            s = segments[0]
            return Step(segments, self._cos[s.start : s.start + s.length], self._sin[s.start : s.start + s.length])
        pos = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(self.device)
        return Step(segments, self._cos[pos], self._sin[pos])

    # ---- math
    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, table)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalize in float32, round to the activation dtype, then scale (as the reference does).
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = fp8_linear(x, w) if isinstance(w, Fp8Weight) else F.linear(x, w)
        return y if bias is None else y + bias

    def mlp(self, w: MlpWeights, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(self.linear(x, w.gate)) * self.linear(x, w.up), w.down)

    def attention(self, w: AttentionWeights, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        """MLA in the absorbed form: the cache holds [normalized latent | roped key] per token."""
        a = self.args
        n, heads, kv_lora = x.shape[0], a.num_attention_heads, a.kv_lora_rank
        if w.q_proj is not None:
            q = self.linear(x, w.q_proj)
        else:
            q = self.linear(self.rms_norm(self.linear(x, w.q_a_proj, w.q_a_bias), w.q_a_norm, a.rms_norm_eps), w.q_b_proj)
        q_nope, q_pe = q.view(n, heads, a.qk_head_dim).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.linear(x, w.kv_a_proj, w.kv_a_bias).split([kv_lora, a.qk_rope_head_dim], dim=-1)
        latent = self.rms_norm(latent, w.kv_a_norm, a.rms_norm_eps)
        cos, sin = step.cos, step.sin
        k_pe = apply_rope(k_pe, cos, sin, a.rope_interleave)  # [n, rope]
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], a.rope_interleave)  # [n, heads, rope]
        rows = torch.cat([latent, k_pe], dim=-1)  # [n, kv_lora + rope]: what the cache keeps
        q_latent = torch.einsum("nhd,hdc->nhc", q_nope, w.w_uk)  # query against the latent directly
        q_all = torch.cat([q_latent.float(), q_pe], dim=-1) * a.softmax_scale  # [n, heads, kv_lora + rope]

        out = torch.empty(n, heads, kv_lora, dtype=torch.float32, device=x.device)
        offset = 0
        for seg in step.segments:
            kv = seg.cache.store(layer, seg.start, rows[offset : offset + seg.length]).float()  # [S, kv_lora+rope]
            scores = torch.einsum("nhc,sc->nhs", q_all[offset : offset + seg.length], kv)
            if seg.length > 1:  # causal: token i (at position start+i) sees keys 0..start+i
                mask = torch.ones(seg.length, kv.shape[0], dtype=torch.bool, device=x.device).triu(seg.start + 1)
                scores.masked_fill_(mask[:, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[offset : offset + seg.length] = torch.einsum("nhs,sc->nhc", probs, kv[:, :kv_lora])
            offset += seg.length
        values = torch.einsum("nhc,hcv->nhv", out.to(x.dtype), w.w_uv)  # [n, heads, v]
        return self.linear(values.reshape(n, heads * a.v_head_dim), w.o_proj, w.o_bias)

    def route(self, w: MoeWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores; the correction bias picks experts (top-2-sum per group, then top-k) but the
        weights come from the unbiased scores. Returns expert ids [n, k] and weights [n, k] float32."""
        a = self.args
        scores = F.linear(x.float(), w.router).sigmoid()
        choice = scores + w.bias
        if a.n_group > 1:
            n, per_group = x.shape[0], a.n_routed_experts // a.n_group
            group_scores = choice.view(n, a.n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)
            groups = group_scores.topk(a.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
        ids = choice.topk(a.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * a.routed_scaling_factor

    def experts(self, w: MoeWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted sum of the routed experts' outputs. Tokens are grouped by expert, so each expert runs
        one matmul per step. Returns the output [n, hidden] and tokens per expert [n_routed]."""
        k = ids.shape[1]
        flat = ids.flatten()
        counts = torch.bincount(flat, minlength=self.args.n_routed_experts)
        order = flat.argsort(stable=True)  # by expert, ascending (the reference's summation order)
        token = order // k
        xs, ws = x[token], weights.flatten()[order]
        ys = torch.empty_like(xs)
        start = 0
        for e, end in enumerate(counts.cumsum(0).tolist()):
            if end > start:
                ys[start:end] = self.mlp(w.experts[e], xs[start:end])
            start = end
        out = torch.zeros_like(x).index_add_(0, token, (ys * ws[:, None]).to(x.dtype))
        return out, counts
