"""The torch backend: DeepSeek-V3 math on torch tensors, on CPU or CUDA.

Activations are 2-D [tokens, hidden]: one forward step carries the new tokens of one or more
requests back to back (`Step.segments`), so linear layers and experts run once per step over all of
them while attention reads each request's own KV cache.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .formats import AffineScales
from ..spec.config import ModelArgs
from .affine import AffineWeight, affine_embed, affine_weight, lanes_fit, to_dense, to_lanes
from .base import AttentionWeights, MlpWeights, MoeWeights
from .cpu_ext import cpu_kernels
from .fp8 import Fp8Weight, dequantize, scaled_mm_linear, scaled_mm_supported, split_kv_b
from .memory import HugePageArena, page_out
from .quant_ops import kernel_args, matmul_args, quantized_linear, vector_level

Weight = torch.Tensor | Fp8Weight | AffineWeight
HeadsWeight = torch.Tensor | Fp8Weight | AffineWeight  # per head: [heads, out, in], or packed [heads * out, in]
# Up to this many tokens a step is a decode step: matrix-vector work bound by reading the weights.
DECODE_TOKENS = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


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


def check_device(device: str) -> torch.device:
    """torch's device for `device` (cpu, cuda, cuda:N, mps), or ValueError saying why this machine has none."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device '{device}' is not one torch knows; choose cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' was requested but torch sees no CUDA GPU")
        if (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' was requested but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was requested but torch sees no Apple GPU (Metal)")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device '{device}' is not one the torch backend runs on; choose cpu, cuda, cuda:N or mps")
    return d


class TorchBackend:
    name = "torch"

    def __init__(self, args: ModelArgs, dtype: str = "bfloat16", device: str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not supported by the torch backend; choose {', '.join(DTYPES)}")
        self.device = check_device(device)
        self.args = args
        self.dtype = DTYPES[dtype]
        # Our decode kernels (few tokens, bf16 compute) where they build; torch's ops otherwise. At the scalar level
        # (cpu_ext.py) they norm, route and dequantize, and torch's matmuls multiply (quant_ops.matmul_args).
        self.kernels = cpu_kernels() if self.device.type == "cpu" and self.dtype == torch.bfloat16 else None
        self._arena = HugePageArena()  # the copies loading makes (CPU)
        self._layers: dict[int, object] = {}  # id(weights) -> their kernels.MoeLayer / MlaLayer, or None (`_layer`)
        self.element_size = torch.tensor([], dtype=self.dtype).element_size()
        inv_freq, self.rope_factor = rope_frequencies(args)
        self.inv_freq = inv_freq.to(self.device)
        self._cos = self._sin = torch.empty(0, args.qk_rope_head_dim // 2, device=self.device)

    # ---- weights: checkpoint tensors (CPU) -> this backend's resident form
    # Where the CPU kernels run, every weight they stream is copied into 2 MB pages (kernels/memory.py) and the
    # checkpoint pages it came from are let go: decode streams every weight, and the mapped file's 4 KB pages
    # cost a TLB miss per 4 KB, most of all in a virtual machine. Elsewhere weights stay as read (mapped).
    def linear_weight(self, weight: torch.Tensor, scales: torch.Tensor | AffineScales | None, heads: int = 1) -> Weight:
        """Dense weights take the compute dtype; FP8 weights stay FP8 with their block scales; MLX affine
        weights stay packed, their scales and biases in the compute dtype — for the CPU kernels, in their
        lane-major order (`to_lanes`) where they are vector code and each of the weight's `heads` (stacked row
        blocks) is whole spans."""
        if isinstance(scales, AffineScales):
            w = affine_weight(weight, scales, self.dtype, self.device)
            if self.kernels is None:
                return w
            lanes = vector_level(self.kernels) and lanes_fit(w) and w.scales.numel() // heads % 16 == 0
            words = (to_lanes(w, self.kernels, self._arena.empty(tuple(w.weight.shape), w.weight.dtype)).weight
                     if lanes else self._held(w.weight))
            held = AffineWeight(words, self._held(w.scales), self._held(w.biases), w.bits, w.group_size, lanes)
            self._let_go(weight, scales.scales, scales.biases)
            return held
        if scales is not None:
            assert self.args.fp8_block is not None
            if self.kernels is None:
                return Fp8Weight(weight.to(self.device), scales.to(self.device), self.args.fp8_block)
            held = Fp8Weight(self._held(weight), self._held(scales), self.args.fp8_block)
            self._let_go(weight, scales)
            return held
        if self.kernels is None:
            return weight.to(self.device, self.dtype)
        held = self._held(weight.to(self.dtype))
        self._let_go(weight)
        return held

    def _held(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t in the arena's 2 MB pages."""
        return self._arena.empty(tuple(t.shape), t.dtype).copy_(t)

    @staticmethod
    def _let_go(*read: torch.Tensor) -> None:
        """The checkpoint tensors a held copy was made from: their mapped pages leave the resident set. Memory
        torch allocated itself (resizable storage: built or streamed weights) is freed with the tensor instead;
        paging it out would only write it to swap first."""
        for t in read:
            if not t.untyped_storage().resizable():
                page_out(t)

    def vector(self, t: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Norm weights, biases and the router (which decode streams too), in the compute dtype or float32."""
        v = t.to(self.device, torch.float32 if fp32 else self.dtype)
        if self.kernels is None:
            return v
        held = self._held(v)
        self._let_go(t)
        return held

    def absorbed_kv_b(self, weight: torch.Tensor, scales: torch.Tensor | AffineScales | None) -> tuple[HeadsWeight, HeadsWeight]:
        """Split kv_b_proj [heads*(nope+v), kv_lora] into per-head linear weights ([out, in], like every
        weight here): W_UK^T [heads, kv_lora, nope] takes a query to the latent space, W_UV [heads, v, kv_lora]
        takes an attended latent to values. The key half must be transposed: FP8 stays FP8 where its blocks
        allow (`fp8.split_kv_b`), anything else takes the compute dtype (~0.15% of a DeepSeek-V3 layer's
        bytes). Checkpoints that store the halves split (mlx-lm's) are held as stored: see `absorbed_heads`."""
        a = self.args
        h, nope, v, kv_lora = a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
        split = split_kv_b(Fp8Weight(weight, scales, a.fp8_block), h, nope, v) if isinstance(scales, torch.Tensor) else None
        if split is not None:
            halves = tuple(Fp8Weight(self._resident(w.weight), self._resident(w.scale_inv), w.block) for w in split)
        else:
            if isinstance(scales, AffineScales):
                weight = to_dense(affine_weight(weight, scales, torch.float32, weight.device), torch.float32)
            elif scales is not None:
                weight = dequantize(Fp8Weight(weight, scales, a.fp8_block), torch.float32)
            w = weight.to(self.dtype).view(h, nope + v, kv_lora)
            halves = self._resident(w[:, :nope].transpose(1, 2).contiguous()), self._resident(w[:, nope:].contiguous())
        self._let_go(weight)  # both halves are copies
        return halves

    def _resident(self, t: torch.Tensor) -> torch.Tensor:
        """A weight copy made at load: held in 2 MB pages for the kernels, else on the device."""
        return self._held(t) if self.kernels is not None else t.to(self.device)

    def absorbed_heads(self, w_uk: tuple[torch.Tensor, AffineScales | None],
                       w_uv: tuple[torch.Tensor, AffineScales | None]) -> tuple[HeadsWeight, HeadsWeight]:
        """mlx-lm's split of kv_b_proj, each half as stored: dense [heads, out, in] in the compute dtype, or
        packed with its heads stacked ([heads * out, in], one AffineWeight) so the kernels read it packed."""
        def resident(weight: torch.Tensor, scales: AffineScales | None) -> HeadsWeight:
            if scales is None:
                return self.linear_weight(weight, None)
            flat = AffineScales(scales.scales.flatten(0, 1), scales.biases.flatten(0, 1), scales.bits, scales.group_size)
            return self.linear_weight(weight.flatten(0, 1), flat, heads=weight.shape[0])

        return resident(*w_uk), resident(*w_uv)

    def linear_heads(self, x: torch.Tensor, w: HeadsWeight) -> torch.Tensor:
        """Per-head linear: x [n, heads, in], w [heads, out, in] (or FP8 / packed, heads stacked) -> [n, heads, out]."""
        args = _head_args(w, self.kernels) if x.shape[0] <= DECODE_TOKENS else None
        if args is not None:
            return self.kernels.linear_heads_q(x, args)
        if isinstance(w, AffineWeight):
            w = to_dense(w, x.dtype).view(x.shape[1], -1, x.shape[2])
        elif isinstance(w, Fp8Weight):
            w = dequantize(w, x.dtype).view(x.shape[1], -1, x.shape[2])
        return torch.bmm(x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)

    # ---- the wire's edge: host (CPU) tensors in and out, dtype and bits unchanged
    def from_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().cpu()  # from a GPU: the one copy a step's hidden state makes to leave the node

    def held_bytes(self) -> int:
        """Bytes the device's allocator holds for this process (CUDA); 0 on the CPU, where the weights and
        caches are counted one by one."""
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

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

    def release_scratch(self, tokens: int) -> None:
        """After a long step (prefill: dequantized tiles, activations of every token), hand its freed buffers
        back to the OS: glibc's malloc keeps them in its heap, tens of MB that resident memory would carry.
        Decode steps reuse what they free, so they keep it. A few microseconds."""
        if tokens > DECODE_TOKENS and self.device.type == "cpu" and _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    # ---- math
    def embed(self, table: torch.Tensor | AffineWeight, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(table, AffineWeight):  # mlx-lm quantizes the embedding too
            args = kernel_args(table) if self.kernels is not None and 0 < ids.numel() <= DECODE_TOKENS else None
            if args is not None:  # a decode step's few rows, dequantized in C++ (cheaper than torch's ops)
                return torch.cat([self.kernels.dequantize_q(args, i, i + 1) for i in ids.tolist()])
            return affine_embed(table, ids, self.dtype)
        return F.embedding(ids, table)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.kernels is not None and x.dtype == weight.dtype == torch.bfloat16:
            return self.kernels.rms_norm_bf16(x, weight, eps)
        # Normalize in float32, round to the activation dtype, then scale (as the reference does).
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, Fp8Weight) and scaled_mm_supported(x, w):
            y = scaled_mm_linear(x, w)
        elif isinstance(w, (Fp8Weight, AffineWeight)):
            y = quantized_linear(x, w, self.kernels, x.shape[0] <= DECODE_TOKENS)
        elif x.shape[0] <= DECODE_TOKENS and x.dim() == 2 and matmul_args(w, self.kernels) is not None:
            y = self.kernels.linear_bf16(x, w)
        else:
            y = F.linear(x, w)
        return y if bias is None else y + bias

    def fuse_gate_up(self, gate: Weight, up: Weight) -> tuple[Weight, Weight]:
        """Dense gate and up weights as the two halves of one [2 * inter, hidden] tensor (same bytes), so that a
        matmul over many tokens does both at once — what transformers does for routed experts."""
        if not (isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor) and gate.shape == up.shape
                and gate.dtype == up.dtype):
            return gate, up
        rows = gate.shape[0]
        if self.kernels is None:  # weights as read: a new tensor
            both = torch.cat([gate, up])
            if both.device.type == "cpu":
                self._let_go(gate, up)
            return both[:rows], both[rows:]
        if self._gate_up(MlpWeights(gate, up, None)) is not None:  # held back to back already
            return gate, up
        both = self._arena.empty((2 * rows, gate.shape[1]), gate.dtype)
        both[:rows], both[rows:] = gate, up
        self._arena.release(gate)
        self._arena.release(up)
        return both[:rows], both[rows:]

    @staticmethod
    def _gate_up(w: MlpWeights) -> torch.Tensor | None:
        """The fused [2 * inter, hidden] view when gate and up were fused by `fuse_gate_up`."""
        gate, up = w.gate, w.up
        if not (isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor) and gate.is_contiguous()
                and gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
                and up.storage_offset() == gate.storage_offset() + gate.numel()):
            return None
        return gate.new_empty(0).set_(gate.untyped_storage(), gate.storage_offset(), (2 * gate.shape[0], gate.shape[1]))

    def mlp(self, w: MlpWeights, x: torch.Tensor) -> torch.Tensor:
        if self._decode_kernels(x):
            args = [matmul_args(t, self.kernels) for t in (w.gate, w.up, w.down)]
            if None not in args:
                return self.kernels.mlp_q(x, *args)
        gate_up = self._gate_up(w)
        if gate_up is not None:
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            return self.linear(F.silu(gate) * up, w.down)
        return self.linear(F.silu(self.linear(x, w.gate)) * self.linear(x, w.up), w.down)

    def _decode_kernels(self, x: torch.Tensor) -> bool:
        return self.kernels is not None and x.dtype == torch.bfloat16 and x.shape[0] <= DECODE_TOKENS

    def attention(self, w: AttentionWeights, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        """MLA in the absorbed form: the cache holds [normalized latent | roped key] per token."""
        held = self._layer(w, self._mla_layer) if self._decode_kernels(x) else None
        if held is not None:  # a decode step: the whole block in one C++ call (csrc/mla.cpp)
            segments = [(s.cache.buffer(layer, s.start + s.length), s.start, s.length) for s in step.segments]
            return held.forward(x, segments, step.cos, step.sin)
        a = self.args
        n, heads, kv_lora = x.shape[0], a.num_attention_heads, a.kv_lora_rank
        if w.q_proj is not None:
            q = self.linear(x, w.q_proj)
        else:
            q = self.linear(self.rms_norm(self.linear(x, w.q_a_proj, w.q_a_bias), w.q_a_norm, a.rms_norm_eps), w.q_b_proj)
        q_nope, q_pe = q.view(n, heads, a.qk_head_dim).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        kv = self.linear(x, w.kv_a_proj, w.kv_a_bias)  # [n, kv_lora + rope]
        rows = torch.cat([self.rms_norm(kv[:, :kv_lora], w.kv_a_norm, a.rms_norm_eps), kv[:, kv_lora:]], dim=-1)
        values = self._attend(w, q_nope, q_pe, rows, step, layer)
        return self.linear(values.reshape(n, heads * a.v_head_dim), w.o_proj, w.o_bias)

    def _mla_layer(self, w: AttentionWeights):
        """The kernels' view of an attention block (csrc/mla.h), or None: biases, or weights the kernels do not take."""
        a = self.args
        q = [w.q_proj] if w.q_proj is not None else [w.q_a_proj, w.q_b_proj]
        args = ([matmul_args(t, self.kernels) for t in (*q, w.kv_a_proj, w.o_proj)]
                + [_head_args(w.w_uk, self.kernels), _head_args(w.w_uv, self.kernels)])
        norms = [t for t in (w.q_a_norm, w.kv_a_norm) if t is not None]
        if (None in args or any(b is not None for b in (w.q_a_bias, w.kv_a_bias, w.o_bias))
                or any(t.dtype != torch.bfloat16 for t in norms)):
            return None
        *q_args, kv_a, o_proj, w_uk, w_uv = args
        return self.kernels.MlaLayer(q_args, w.q_a_norm if w.q_a_norm is not None else _NO_NORM, kv_a, w.kv_a_norm,
                                     w_uk, w_uv, o_proj, a.num_attention_heads, a.qk_rope_head_dim, a.rms_norm_eps,
                                     a.softmax_scale, a.rope_interleave)

    def _attend(self, w: AttentionWeights, q_nope, q_pe, rows, step: Step, layer: int) -> torch.Tensor:
        """Any number of tokens, in torch ops; the scores and softmax run in float32."""
        a = self.args
        n, heads, kv_lora = q_nope.shape[0], a.num_attention_heads, a.kv_lora_rank
        cos, sin = step.cos, step.sin
        k_pe = apply_rope(rows[:, kv_lora:], cos, sin, a.rope_interleave)  # [n, rope]
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], a.rope_interleave)  # [n, heads, rope]
        rows = torch.cat([rows[:, :kv_lora], k_pe], dim=-1)  # what the cache keeps
        q_latent = self.linear_heads(q_nope, w.w_uk)  # [n, heads, kv_lora]: the query against the latent
        q_all = torch.cat([q_latent.float(), q_pe.float()], dim=-1) * a.softmax_scale  # [n, heads, kv_lora + rope]

        out = torch.empty(n, heads, kv_lora, dtype=torch.float32, device=q_nope.device)
        offset = 0
        for seg in step.segments:
            kv = seg.cache.store(layer, seg.start, rows[offset : offset + seg.length]).float()  # [S, kv_lora+rope]
            scores = q_all[offset : offset + seg.length] @ kv.T  # [n, heads, S]
            if seg.length > 1:  # causal: token i (at position start+i) sees keys 0..start+i
                mask = torch.ones(seg.length, kv.shape[0], dtype=torch.bool, device=kv.device).triu(seg.start + 1)
                scores.masked_fill_(mask[:, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[offset : offset + seg.length] = probs @ kv[:, :kv_lora]
            offset += seg.length
        return self.linear_heads(out.to(q_nope.dtype), w.w_uv)  # [n, heads, v]

    def route(self, w: MoeWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores; the correction bias picks experts (top-2-sum per group, then top-k) but the
        weights come from the unbiased scores. Returns expert ids [n, k] and weights [n, k] float32."""
        a = self.args
        if self._decode_kernels(x):
            ids, weights = self.kernels.route_bf16(x, w.router, w.bias, a.n_group, a.topk_group, a.num_experts_per_tok,
                                                   a.norm_topk_prob, a.routed_scaling_factor)
            return ids, weights
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

    def expert_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens routed to each expert [n_routed] (placement statistics)."""
        return torch.bincount(ids.flatten(), minlength=self.args.n_routed_experts)

    def moe(self, w: MoeWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A MoE layer's output [n, hidden]: the routed experts' weighted sum, then plus the shared experts."""
        out = self._experts_kernel(w, x, ids, weights, with_shared=w.shared is not None)
        if out is not None:
            return out
        out = self.experts(w, x, ids, weights)
        return out if w.shared is None else out + self.mlp(w.shared, x)

    def _experts_kernel(self, w: MoeWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        with_shared: bool) -> torch.Tensor | None:
        """Decode steps: every chosen expert (and the shared one, if asked) in one C++ call (csrc/moe.cpp)."""
        held = self._layer(w, self._moe_layer) if self._decode_kernels(x) else None
        return None if held is None else held.forward(x, ids, weights, with_shared)

    def _layer(self, w: AttentionWeights | MoeWeights, make):
        """The kernels' view of a layer's weights (`make(w)`: a MoeLayer or MlaLayer, or None where some weight is
        in a form the kernels do not take), made at its first decode step and kept while w lives."""
        key = id(w)
        if key not in self._layers:
            self._layers[key] = make(w)
            weakref.finalize(w, self._layers.pop, key, None)
        return self._layers[key]

    def _moe_layer(self, w: MoeWeights):
        mlps = [*w.experts.values()] + ([w.shared] if w.shared is not None else [])
        args = [[matmul_args(t, self.kernels) for t in (m.gate, m.up, m.down)] for m in mlps]
        if any(None in a for a in args):
            return None
        routed = args[: len(w.experts)]
        return self.kernels.MoeLayer([*w.experts], *([a[i] for a in routed] for i in range(3)),
                                     args[-1] if w.shared is not None else [])

    def experts(self, w: MoeWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the routed experts' outputs [n, hidden]. Tokens are grouped by expert, so each
        expert runs one matmul per step; each token's terms add up in ascending expert order."""
        out = self._experts_kernel(w, x, ids, weights, with_shared=False)
        if out is not None:
            return out
        if x.shape[0] == 1:  # one token (decode): no grouping needed; sum in ascending expert order
            out = None
            for e, weight in sorted(zip(ids[0].tolist(), weights[0].tolist())):
                y = self.mlp(w.experts[e], x) * weight  # float32 math, rounded to x's dtype
                out = y if out is None else out + y
            return out
        n, k = ids.shape
        token = torch.arange(n, device=x.device).repeat_interleave(k)
        rows = self.expert_rows(w.experts, x, token, ids.flatten(), weights.flatten())
        return self.combine_pairs(ids, rows.view(n, k, -1))

    def expert_rows(self, experts: dict[int, MlpWeights], x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
        """One row per (token, expert) pair: mlp_expert(x[token]) * weight, rounded to x's dtype — the terms
        `experts` sums, for pairs whose experts may live on several nodes. Grouped by expert like `experts`."""
        rows = torch.empty(token.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        order = expert.argsort(stable=True)
        start = 0
        for e, count in zip(*torch.unique_consecutive(expert[order], return_counts=True)):
            pick = order[start : start + int(count)]
            rows[pick] = (self.mlp(experts[int(e)], x[token[pick]]) * weight[pick, None]).to(x.dtype)
            start += int(count)
        return rows

    def combine_pairs(self, ids: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Sum pairs [n, k, hidden] per token in ascending expert order, rounding each addition to the
        activation dtype — the reference adds one expert at a time, so must we."""
        n, k, hidden = pairs.shape
        rows = (torch.arange(n, device=ids.device)[:, None] * k + ids.argsort(dim=1, stable=True)).flatten()
        pairs = pairs.view(n * k, hidden).index_select(0, rows).view(n, k, hidden)
        out = pairs[:, 0]
        for j in range(1, k):
            out = out + pairs[:, j]
        return out


_NO_NORM = torch.empty(0, dtype=torch.bfloat16)


def _head_args(w: HeadsWeight, kernels) -> tuple | None:
    """The decode kernels' view of per-head weights: the heads stacked as one [heads * out, in] weight."""
    return matmul_args(w.view(-1, w.shape[-1]) if isinstance(w, torch.Tensor) else w, kernels)
