"""FP8 e4m3 weights with block scales (the official DeepSeek-V3 checkpoint format; docs/formats.md), kept
FP8 in memory. No full-size copy of the weight ever exists: on CPU, decode
steps run csrc/quant.cpp's kernel on the FP8 bytes where it is vector code; otherwise the matmul dequantizes
a band of rows at a time into a reused buffer (here, or in that kernel; `bands.py`), or runs torch's
blockwise-scaled FP8 matmul on Hopper GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec.formats import FP8_BLOCK, FP8_E4M3_MAX
from .bands import band_rows, banded_linear, scratch
from .formats import fp8_dequantize


@dataclass
class Fp8Weight:
    weight: torch.Tensor  # [out, in] float8_e4m3fn
    scale_inv: torch.Tensor  # [ceil(out/b0), ceil(in/b1)] float32
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes

    def rows(self, start: int, stop: int) -> Fp8Weight:
        """Rows [start, stop) as a view; start must be on a block boundary."""
        b0 = self.block[0]
        assert start % b0 == 0, "row slices of an FP8 weight start on a block boundary"
        return Fp8Weight(self.weight[start:stop], self.scale_inv[start // b0 : -(-stop // b0)], self.block)


def split_kv_b(w: Fp8Weight, heads: int, nope: int, v: int) -> tuple[Fp8Weight, Fp8Weight] | None:
    """MLA's kv_b_proj [heads*(nope+v), kv_lora] as the two per-head products of absorbed attention, still
    FP8, each with its heads stacked: W_UK^T [heads*kv_lora, nope] (the key half transposed: a 128x128 block
    transposes into a block with the same scale, so this is exact) and W_UV [heads*v, kv_lora]. None unless
    nope, v and kv_lora are whole square blocks (DeepSeek-V3's are)."""
    b, kv_lora = w.block[0], w.shape[1]
    if w.block != (b, b) or nope % b or v % b or kv_lora % b:
        return None
    q = w.weight.view(heads, nope + v, kv_lora)
    s = w.scale_inv.view(heads, (nope + v) // b, kv_lora // b)

    def stacked(t: torch.Tensor) -> torch.Tensor:  # [heads, rows, columns] -> [heads * rows, columns]
        return t.contiguous().view(-1, t.shape[-1])

    return (Fp8Weight(stacked(q[:, :nope].transpose(1, 2)), stacked(s[:, : nope // b].transpose(1, 2)), w.block),
            Fp8Weight(stacked(q[:, nope:]), stacked(s[:, nope // b :]), w.block))


def dequantize(w: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return fp8_dequantize(w.weight, w.scale_inv, w.block, dtype)


def dequantize_into(w: Fp8Weight, out: torch.Tensor) -> None:
    """out [rows, in] = w dequantized as `fp8_dequantize` does it (float32 math, rounded once to out's dtype),
    through this thread's reused scratch rather than fresh temporaries."""
    (rows, cols), (b0, b1) = w.weight.shape, w.block
    f = scratch("f", rows * cols, torch.float32, w.weight.device).view(rows, cols)
    f.copy_(w.weight)
    if rows % b0 == 0 and cols % b1 == 0:
        f.view(rows // b0, b0, cols // b1, b1).mul_(w.scale_inv[:, None, :, None])
    else:
        f.mul_(w.scale_inv.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols])
    out.copy_(f)


def fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x @ W.T with W dequantized one band of whole block rows at a time into a reused buffer."""
    return banded_linear(x, w.shape[0], band_rows(x.numel() // x.shape[-1], x.shape[-1], w.block[0]),
                         lambda start, stop, band: dequantize_into(w.rows(start, stop), band))


def scaled_mm_supported(x: torch.Tensor, w: Fp8Weight) -> bool:
    """torch's blockwise-scaled FP8 matmul needs a Hopper GPU (compute capability 9.x) with CUDA >= 12.9,
    bf16 activations, 128x128 weight blocks and both weight dims multiples of 128."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and w.block == FP8_BLOCK):
        return False
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    out, inp = w.weight.shape
    return torch.cuda.get_device_capability(x.device)[0] == 9 and cuda >= (12, 9) and out % 128 == 0 and inp % 128 == 0


def scaled_mm_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x @ W.T on the GPU's FP8 tensor cores: the activations are quantized to e4m3 per token and 128
    columns (DeepSeek-V3's own inference recipe); the weight is used as stored.
    tests/test_quant_kernels.py checks it wherever such a GPU is present."""
    from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

    n, k = x.shape
    blocks = x.float().unflatten(1, (k // 128, 128))
    x_scale = blocks.abs().amax(-1).clamp(min=1e-12) / FP8_E4M3_MAX  # [n, k/128]
    xq = (blocks / x_scale[..., None]).to(torch.float8_e4m3fn).flatten(1)
    # scale layouts as torch expects them: activations' [n, k/128] column-major; the weight's block scales
    # [k/128 padded to a multiple of 4, out/128], column-major
    w_scale = torch.nn.functional.pad(w.scale_inv, (0, -(k // 128) % 4)).t()
    return scaled_mm(xq, w.weight.t(), x_scale.t().contiguous().t(), ScalingType.BlockWise1x128, w_scale,
                     ScalingType.BlockWise128x128, swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE,
                     output_dtype=x.dtype)
