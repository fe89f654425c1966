"""The MLX backend: the same DeepSeek-V3 math as the torch backend, on mlx arrays (Metal on Apple silicon;
MLX's CPU backend elsewhere, which is for correctness rather than speed).

Quantized weights stay as stored: MLX affine int4/int8 run `mx.quantized_matmul` on the packed words (the
layout mlx-lm writes is MLX's own), FP8 e4m3 weights keep their bytes and are dequantized a band of rows at a
time. Activations are 2-D [tokens, hidden] as in the torch backend; see that file for the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

from .formats import AffineScales
from ..spec.config import ModelArgs
from .base import AttentionWeights, MlpWeights, MoeWeights
from .fp8 import Fp8Weight, split_kv_b
from .torch_backend import DECODE_TOKENS, rope_frequencies

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_BAND_ROWS = 512  # FP8 rows dequantized at once


@dataclass
class MlxAffine:
    weight: mx.array  # [out, in * bits / 32] uint32
    scales: mx.array  # [out, in / group_size]
    biases: mx.array
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes


@dataclass
class MlxFp8:
    weight: mx.array  # [out, in] uint8: e4m3 bytes
    scale_inv: mx.array  # [ceil(out/b0), ceil(in/b1)] float32
    block: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes


@dataclass
class Step:
    segments: list
    cos: mx.array  # [tokens, rope/2] float32, attention factor applied
    sin: mx.array


def host_to_mx(t: torch.Tensor) -> mx.array:
    """A CPU tensor as an mlx array of the same dtype and bits (numpy has no bfloat16: it passes as its 16-bit
    words); FP8 e4m3 as its bytes (uint8)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    if t.dtype == torch.uint32:
        return mx.array(t.view(torch.int32).numpy()).view(mx.uint32)
    if t.dtype == torch.float8_e4m3fn:
        return mx.array(t.view(torch.uint8).numpy())
    return mx.array(t.numpy())


def mx_to_host(x: mx.array) -> torch.Tensor:
    """An mlx array as a CPU tensor of the same dtype and bits."""
    if x.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(x.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(x))


def to_mx(t: torch.Tensor, dtype: mx.Dtype | None = None) -> mx.array:
    """A checkpoint tensor as a resident mlx array, in `dtype` if given. Evaluated now: MLX is lazy, and an
    unevaluated cast would keep the source array alive until the weight's first use."""
    a = host_to_mx(t)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    mx.eval(a)
    return a


def fp8_dense(w: MlxFp8, dtype: mx.Dtype) -> mx.array:
    """W8 * scale_inv block-wise, in float32, rounded once to `dtype`."""
    out, inp = w.weight.shape
    b0, b1 = w.block
    scale = mx.repeat(mx.repeat(w.scale_inv, b0, axis=0)[:out], b1, axis=1)[:, :inp]
    return (mx.from_fp8(w.weight, dtype=mx.float32) * scale).astype(dtype)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array, interleave: bool) -> mx.array:
    """As torch_backend.apply_rope: the result is laid out [rotated firsts | rotated seconds]."""
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class MlxBackend:
    name = "mlx"

    def __init__(self, args: ModelArgs, dtype: str = "bfloat16", device: str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not supported by the mlx backend; choose {', '.join(DTYPES)}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device '{device}' is not one the mlx backend knows; choose cpu or gpu")
        if device == "gpu" and not mx.metal.is_available():
            raise ValueError("device 'gpu' was requested but MLX sees no Metal GPU on this machine")
        self.device = device
        mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
        self.args = args
        self.dtype = DTYPES[dtype]
        self.element_size = self.dtype.size
        inv_freq, self.rope_factor = rope_frequencies(args)
        self.inv_freq = inv_freq.numpy()
        self._cos = self._sin = mx.zeros((0, args.qk_rope_head_dim // 2))

    # ---- weights: checkpoint tensors (torch, CPU) -> resident mlx arrays
    def linear_weight(self, weight: torch.Tensor, scales: torch.Tensor | AffineScales | None):
        if isinstance(scales, AffineScales):
            return MlxAffine(to_mx(weight), to_mx(scales.scales, self.dtype), to_mx(scales.biases, self.dtype),
                             scales.bits, scales.group_size)
        if scales is not None:
            return MlxFp8(to_mx(weight), to_mx(scales), self.args.fp8_block)
        return to_mx(weight, self.dtype)

    def vector(self, t: torch.Tensor, fp32: bool = False) -> mx.array:
        return to_mx(t, mx.float32 if fp32 else self.dtype)

    def absorbed_kv_b(self, weight: torch.Tensor, scales: torch.Tensor | AffineScales | None) -> tuple[mx.array, mx.array]:
        """W_UK^T [heads, kv_lora, nope] and W_UV [heads, v, kv_lora] (see the torch backend): FP8 stays FP8 with
        the heads stacked where its blocks allow, anything else takes the compute dtype."""
        a = self.args
        if isinstance(scales, torch.Tensor):
            split = split_kv_b(Fp8Weight(weight, scales, a.fp8_block), a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim)
            if split is not None:
                return tuple(self.linear_weight(w.weight, w.scale_inv) for w in split)
        w = self.linear_weight(weight, scales)
        if isinstance(w, MlxAffine):
            w = mx.dequantize(w.weight, w.scales, w.biases, group_size=w.group_size, bits=w.bits)
        elif isinstance(w, MlxFp8):
            w = fp8_dense(w, mx.float32)
        w = w.astype(self.dtype).reshape(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        halves = mx.contiguous(w[:, : a.qk_nope_head_dim].transpose(0, 2, 1)), mx.contiguous(w[:, a.qk_nope_head_dim :])
        mx.eval(*halves)
        return halves

    def absorbed_heads(self, w_uk: tuple[torch.Tensor, AffineScales | None], w_uv: tuple[torch.Tensor, AffineScales | None]):
        """mlx-lm's split halves as stored: [heads, out, in], dense or packed (as mlx-lm's QuantizedMultiLinear)."""
        return self.linear_weight(*w_uk), self.linear_weight(*w_uv)

    def release_scratch(self, tokens: int) -> None:
        """After a prefill step, empty MLX's buffer cache (it keeps freed buffers for reuse); decode keeps it."""
        if tokens > DECODE_TOKENS:
            mx.clear_cache()

    # ---- the wire's edge: host (CPU) tensors in and out, dtype and bits unchanged
    def from_host(self, t: torch.Tensor) -> mx.array:
        return host_to_mx(t)

    def to_host(self, x: mx.array) -> torch.Tensor:
        return mx_to_host(x)  # evaluates the step's graph

    def held_bytes(self) -> int:
        """Bytes in MLX arrays now (weights, caches, live activations), as MLX's allocator counts them."""
        return mx.get_active_memory()

    # ---- arrays
    def tokens(self, ids: list[int]) -> mx.array:
        return mx.array(ids, dtype=mx.int32)

    def empty(self, rows: int, width: int) -> mx.array:
        return mx.zeros((rows, width), dtype=self.dtype)

    def concat(self, xs: list[mx.array]) -> mx.array:
        return mx.concatenate(xs, axis=-1)

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)

    def step(self, segments: list) -> Step:
        end = max(s.start + s.length for s in segments)
        if end > self._cos.shape[0]:
            freqs = np.outer(np.arange(max(end, 2 * self._cos.shape[0]), dtype=np.float32), self.inv_freq)
            self._cos = mx.array(np.cos(freqs) * self.rope_factor)
            self._sin = mx.array(np.sin(freqs) * self.rope_factor)
        pos = mx.array(np.concatenate([np.arange(s.start, s.start + s.length) for s in segments]))
        return Step(segments, self._cos[pos], self._sin[pos])

    # ---- math
    def embed(self, table, ids: mx.array) -> mx.array:
        if isinstance(table, MlxAffine):  # dequantize just the rows looked up
            return mx.dequantize(table.weight[ids], table.scales[ids], table.biases[ids], group_size=table.group_size,
                                 bits=table.bits).astype(self.dtype)
        return table[ids]

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        xf = x.astype(mx.float32)
        return weight * (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)

    def linear(self, x: mx.array, w, bias: mx.array | None = None) -> mx.array:
        if isinstance(w, MlxAffine):
            y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True, group_size=w.group_size, bits=w.bits)
        elif isinstance(w, MlxFp8):
            rows = range(0, w.weight.shape[0], _BAND_ROWS)
            b0 = w.block[0]
            y = mx.concatenate([x @ fp8_dense(MlxFp8(w.weight[r : r + _BAND_ROWS], w.scale_inv[r // b0 : -(-(r + _BAND_ROWS) // b0)],
                                                     w.block), x.dtype).T for r in rows], axis=-1)
        else:
            y = x @ w.T
        return y if bias is None else y + bias

    def fuse_gate_up(self, gate, up):
        return gate, up

    def mlp(self, w: MlpWeights, x: mx.array) -> mx.array:
        g = self.linear(x, w.gate)
        return self.linear((g * mx.sigmoid(g.astype(mx.float32)).astype(g.dtype)) * self.linear(x, w.up), w.down)

    def linear_heads(self, x: mx.array, w: mx.array | MlxAffine | MlxFp8) -> mx.array:
        """Per-head linear: x [n, heads, in], w [heads, out, in] (dense or packed; FP8 heads stacked) -> [n, heads, out]."""
        x = x.transpose(1, 0, 2)
        if isinstance(w, MlxFp8):  # heads stacked: [heads * out, in]
            w = fp8_dense(w, x.dtype).reshape(x.shape[0], -1, x.shape[2])
        if isinstance(w, MlxAffine):
            y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True, group_size=w.group_size, bits=w.bits)
        else:
            y = x @ w.transpose(0, 2, 1)
        return y.transpose(1, 0, 2)

    def attention(self, w: AttentionWeights, x: mx.array, step: Step, layer: int) -> mx.array:
        """MLA in the absorbed form; the cache holds [normalized latent | roped key] per token."""
        a = self.args
        n, heads, kv_lora = x.shape[0], a.num_attention_heads, a.kv_lora_rank
        if w.q_proj is not None:
            q = self.linear(x, w.q_proj)
        else:
            q = self.linear(self.rms_norm(self.linear(x, w.q_a_proj, w.q_a_bias), w.q_a_norm, a.rms_norm_eps), w.q_b_proj)
        q = q.reshape(n, heads, a.qk_head_dim)
        q_nope, q_pe = q[..., : a.qk_nope_head_dim], q[..., a.qk_nope_head_dim :]
        kv = self.linear(x, w.kv_a_proj, w.kv_a_bias)  # [n, kv_lora + rope]
        k_pe = apply_rope(kv[:, kv_lora:], step.cos, step.sin, a.rope_interleave)
        q_pe = apply_rope(q_pe, step.cos[:, None], step.sin[:, None], a.rope_interleave)
        rows = mx.concatenate([self.rms_norm(kv[:, :kv_lora], w.kv_a_norm, a.rms_norm_eps), k_pe], axis=-1)
        q_latent = self.linear_heads(q_nope, w.w_uk)  # [n, heads, kv_lora]
        q_all = mx.concatenate([q_latent.astype(mx.float32), q_pe.astype(mx.float32)], axis=-1) * a.softmax_scale
        parts, offset = [], 0
        for seg in step.segments:
            cached = seg.cache.store(layer, seg.start, rows[offset : offset + seg.length]).astype(mx.float32)
            scores = q_all[offset : offset + seg.length] @ cached.T  # [n, heads, S]
            if seg.length > 1:  # causal: token i (at position start+i) sees keys 0..start+i
                mask = np.triu(np.ones((seg.length, cached.shape[0]), dtype=bool), seg.start + 1)
                scores = mx.where(mx.array(mask)[:, None, :], -mx.inf, scores)
            parts.append(mx.softmax(scores, axis=-1) @ cached[:, :kv_lora])
            offset += seg.length
        latent = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        values = self.linear_heads(latent.astype(x.dtype), w.w_uv)  # [n, heads, v]
        return self.linear(values.reshape(n, heads * a.v_head_dim), w.o_proj, w.o_bias)

    def route(self, w: MoeWeights, x: mx.array) -> tuple[mx.array, mx.array]:
        """As the torch backend: the correction bias picks experts, the unbiased sigmoid scores weight them."""
        a = self.args
        scores = mx.sigmoid(x.astype(mx.float32) @ w.router.T)
        choice = scores + w.bias
        if a.n_group > 1:
            n, per_group = x.shape[0], a.n_routed_experts // a.n_group
            grouped = choice.reshape(n, a.n_group, per_group)
            group_scores = mx.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
            dropped = mx.argpartition(group_scores, kth=a.n_group - a.topk_group - 1, axis=-1)[:, : a.n_group - a.topk_group]
            if a.n_group > a.topk_group:
                grouped = mx.put_along_axis(grouped, dropped[..., None], mx.array(-mx.inf), axis=1)
            choice = grouped.reshape(n, -1)
        k = a.num_experts_per_tok
        ids = mx.argpartition(-choice, kth=k - 1, axis=-1)[:, :k]
        weights = mx.take_along_axis(scores, ids, axis=-1)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return ids, weights * a.routed_scaling_factor

    def expert_counts(self, ids: mx.array) -> mx.array:
        return mx.array(np.bincount(np.array(ids).ravel(), minlength=self.args.n_routed_experts))

    def moe(self, w: MoeWeights, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
        out = self.experts(w, x, ids, weights)
        return out if w.shared is None else out + self.mlp(w.shared, x)

    def experts(self, w: MoeWeights, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
        n, k = ids.shape
        token = mx.repeat(mx.arange(n), k)
        rows = self.expert_rows(w.experts, x, token, ids.reshape(-1), weights.reshape(-1))
        return self.combine_pairs(ids, rows.reshape(n, k, -1))

    def expert_rows(self, experts: dict[int, MlpWeights], x: mx.array, token: mx.array, expert: mx.array,
                    weight: mx.array) -> mx.array:
        """mlp_expert(x[token]) * weight for each (token, expert) pair, each expert run once on its tokens."""
        expert_np = np.array(expert)
        rows = mx.zeros((expert_np.shape[0], x.shape[1]), dtype=x.dtype)
        for e in np.unique(expert_np):
            pick = mx.array(np.flatnonzero(expert_np == e))
            rows[pick] = (self.mlp(experts[int(e)], x[token[pick]]) * weight[pick][:, None]).astype(x.dtype)
        return rows

    def combine_pairs(self, ids: mx.array, pairs: mx.array) -> mx.array:
        """Sum pairs [n, k, hidden] per token in ascending expert order (the torch backend's order)."""
        order = mx.argsort(ids, axis=1)
        pairs = mx.take_along_axis(pairs, order[..., None], axis=1)
        out = pairs[:, 0]
        for j in range(1, pairs.shape[1]):
            out = out + pairs[:, j]
        return out
