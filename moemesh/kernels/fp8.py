"""FP8 e4m3 weights with block scales (the official DeepSeek-V3 checkpoint format), kept FP8 in memory.

A weight W [out, in] is stored as e4m3 values plus `scale_inv` [ceil(out/b0), ceil(in/b1)] in float32;
the real weight is W8 * scale_inv, block-wise. The matmul dequantizes a band of rows at a time, so no
full-size copy of the weight ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows dequantized at once: bounds the temporary copy to ~this many rows of the weight.
_BAND_ROWS = 512


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


def dequantize(w: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8 * scale_inv, block-wise, as `dtype` (float32 math, rounded once)."""
    out, inp = w.weight.shape
    b0, b1 = w.block
    scale = w.scale_inv.repeat_interleave(b0, dim=0)[:out].repeat_interleave(b1, dim=1)[:, :inp]
    return (w.weight.to(torch.float32) * scale).to(dtype)


def fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x @ W.T with W dequantized one band of rows at a time."""
    out = w.weight.shape[0]
    band = max(_BAND_ROWS // w.block[0], 1) * w.block[0]
    if out <= band:
        return torch.nn.functional.linear(x, dequantize(w, x.dtype))
    parts = [torch.nn.functional.linear(x, dequantize(w.rows(r, min(r + band, out)), x.dtype))
             for r in range(0, out, band)]
    return torch.cat(parts, dim=-1)
