"""The compact weight formats in torch: pack, quantize and dequantize, as stored in checkpoints. The checkpoint
reader, the kernels, `moemesh quantize`, the benchmarks and the tests all take them from here; the formats'
constants are in `moemesh.spec.formats` (docs/formats.md has the byte-level layouts).

MLX affine (what `mx.quantize` and mlx-lm write): a weight W [out, in] is cut into groups of `group_size` consecutive inputs; each group has a scale s and a
bias b, and each weight is an unsigned integer q of `bits` bits: W ~ q * s + b. Storage:
- `weight`  uint32 [out, in * bits / 32]: 32/bits values per word, the first in the lowest bits;
- `scales`, `biases` [out, in / group_size], in the model's float dtype.
The quantizer below reproduces `mx.quantize` bit for bit (tests check it), so a shard written here serves
torch, MLX and mlx-lm alike.

FP8 (the official DeepSeek-V3 format): a weight W [out, in] is stored as e4m3 values plus `scale_inv`
[ceil(out/b0), ceil(in/b1)] in float32; the real weight is W8 * scale_inv, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spec.formats import BITS, FP8_E4M3_MAX, GROUP_SIZES


@dataclass
class AffineScales:
    """The per-group parameters that come with a packed weight (`<stem>.scales`, `<stem>.biases`)."""
    scales: torch.Tensor  # [..., out, in / group_size] float
    biases: torch.Tensor  # same shape and dtype
    bits: int
    group_size: int


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers q [..., in] (0 <= q < 2**bits) -> uint32 words [..., in * bits / 32], first value lowest."""
    per_word = 32 // bits
    q = q.to(torch.int64).unflatten(-1, (-1, per_word))
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (q << shifts).sum(-1).to(torch.uint32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 (or int32-viewed) words [..., w] -> integers [..., w * 32 / bits] as int32."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    q = (words.view(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.flatten(-2)


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, AffineScales]:
    """`mx.quantize(w, group_size, bits)` in torch: float32 math; the scale is chosen so that the group's
    value of largest magnitude is exact, and scales/biases are stored in w's dtype."""
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"affine quantization takes bits in {BITS} and group_size in {GROUP_SIZES}")
    if w.shape[-1] % group_size:
        raise ValueError(f"the last dimension ({w.shape[-1]}) must be a multiple of group_size {group_size}")
    groups = w.float().unflatten(-1, (-1, group_size))  # [..., in / g, g]
    hi, lo = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)
    levels = float((1 << bits) - 1)
    from_lo = lo.abs() > hi.abs()  # anchor the scale on the end of larger magnitude
    scale = torch.clamp((hi - lo) / levels, min=1e-7)
    scale = torch.where(from_lo, scale, -scale)
    edge = torch.where(from_lo, lo, hi)
    q0 = torch.round(edge / scale)
    scale = torch.where(q0 != 0, edge / q0, scale)
    bias = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = torch.clamp(torch.round((groups - bias) / scale), 0, levels).flatten(-2)
    return pack(q, bits), AffineScales(scale.squeeze(-1).to(w.dtype), bias.squeeze(-1).to(w.dtype), bits, group_size)


def dequantize(words: torch.Tensor, s: AffineScales, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale + bias per group, in float32, rounded once to `dtype`."""
    q = unpack(words, s.bits).float().unflatten(-1, (-1, s.group_size))
    w = q * s.scales.float().unsqueeze(-1) + s.biases.float().unsqueeze(-1)
    return w.flatten(-2).to(dtype)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The official block quantization: per block scale_inv = amax / 448, values = w / scale_inv in e4m3.
    Returns (e4m3 [out, in], float32 scale_inv [ceil(out/b0), ceil(in/b1)]); partial edge blocks are scaled
    by their own amax."""
    out, inp = w.shape
    b0, b1 = block
    po, pi = -out % b0, -inp % b1
    blocks = F.pad(w.float(), (0, pi, 0, po)).view((out + po) // b0, b0, (inp + pi) // b1, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8) / FP8_E4M3_MAX
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(out + po, inp + pi)[:out, :inp].contiguous(), scale


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8 * scale_inv, block by block, as `dtype` (float32 math, rounded once)."""
    out, inp = weight.shape
    b0, b1 = block
    scale = scale_inv.repeat_interleave(b0, dim=0)[:out].repeat_interleave(b1, dim=1)[:, :inp]
    return (weight.to(torch.float32) * scale).to(dtype)
