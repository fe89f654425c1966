"""MLX affine int4/int8 weights (see `moemesh/model/affine.py` for the format) on the torch backend.

They stay packed in memory. Decode steps run our C++ kernel (csrc/quant.cpp), which multiplies the
packed values directly; everything else dequantizes a band of rows at a time and calls torch's matmul,
so no full-size float copy of the weight ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.affine import AffineScales, dequantize

_BAND_ROWS = 512  # rows dequantized at once: bounds the temporary copy


@dataclass
class AffineWeight:
    weight: torch.Tensor  # [out, in * bits / 32] int32 (the stored uint32 words, viewed as int32)
    scales: torch.Tensor  # [out, in / group_size], the compute dtype
    biases: torch.Tensor  # same
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 32 // self.bits

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    @property
    def format(self) -> AffineScales:
        return AffineScales(self.scales, self.biases, self.bits, self.group_size)

    def rows(self, start: int, stop: int) -> AffineWeight:
        return AffineWeight(self.weight[start:stop], self.scales[start:stop], self.biases[start:stop], self.bits,
                            self.group_size)


def affine_weight(weight: torch.Tensor, s: AffineScales, dtype: torch.dtype, device: torch.device) -> AffineWeight:
    """Checkpoint tensors -> resident form: words as int32 (torch's shifts want a signed type), scales and
    biases in the compute dtype."""
    return AffineWeight(weight.view(torch.int32).to(device), s.scales.to(device, dtype), s.biases.to(device, dtype),
                        s.bits, s.group_size)


def to_dense(w: AffineWeight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(w.weight, w.format, dtype)


def affine_linear(x: torch.Tensor, w: AffineWeight) -> torch.Tensor:
    """x @ W.T with W dequantized one band of rows at a time (any dtype, any device)."""
    out = w.weight.shape[0]
    if out <= _BAND_ROWS:
        return F.linear(x, to_dense(w, x.dtype))
    return torch.cat([F.linear(x, to_dense(w.rows(r, min(r + _BAND_ROWS, out)), x.dtype))
                      for r in range(0, out, _BAND_ROWS)], dim=-1)


def affine_embed(table: AffineWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Embedding rows of a quantized table, dequantized (mlx-lm quantizes embeddings too)."""
    rows = AffineWeight(table.weight[ids], table.scales[ids], table.biases[ids], table.bits, table.group_size)
    return to_dense(rows, dtype)
