"""MLX affine int4/int8 weights (see `moemesh/model/affine.py` for the format) on the torch backend.

They stay packed in memory. Decode steps run our C++ kernel (csrc/quant.cpp), which multiplies the
packed values directly; everything else dequantizes a band of rows at a time and calls torch's matmul,
so no full-size float copy of the weight ever exists. Where that kernel runs, the torch backend holds
weights of whole 16-group spans in a lane-major byte order (`to_lanes`): the same bytes, permuted within
each span, which the kernel multiplies with ~20% less work; `words` gives them back in MLX order.
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
    lanes: bool = False  # bytes in the kernels' lane-major order (see `to_lanes`), not MLX's

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
                            self.group_size, self.lanes)

    def words(self) -> torch.Tensor:
        """The packed words in MLX's order."""
        if not self.lanes:
            return self.weight
        order = lanes_order(self.bits, self.group_size)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return _permute_spans(self.weight, inverse)


def lanes_order(bits: int, group_size: int) -> torch.Tensor:
    """The lane-major layout (csrc/quant.h, `lanes_source_byte`): for each byte of a span of 16 groups, the
    MLX-order byte of the span it holds. Chunk p = b // 64 of the span, u16 lane j = b % 64 // 2, byte h = b % 2
    hold group j // 2's bytes 4p + 2 (j % 2) + h: every fp32 lane of a chunk keeps to one group."""
    group_bytes = group_size * bits // 8
    b = torch.arange(16 * group_bytes)
    p, j, h = b // 64, b % 64 // 2, b % 2
    return j // 2 * group_bytes + 4 * p + 2 * (j % 2) + h


def _permute_spans(words: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    rows = words.shape[0]
    spans = words.contiguous().view(torch.uint8).view(rows, -1, order.numel())
    return spans[:, :, order].reshape(rows, -1).view(torch.int32)


def lanes_fit(w: AffineWeight) -> bool:
    """Whether w can take the lane-major layout: bf16 scales (the kernels'), rows of whole 16-group spans."""
    return (not w.lanes and w.bits in (4, 8) and w.scales.dtype == torch.bfloat16 and w.weight.dim() == 2
            and w.scales.shape[-1] % 16 == 0)


def to_lanes(w: AffineWeight) -> AffineWeight:
    """A copy of w in the lane-major layout (for the decode kernel; same bytes, permuted within each span)."""
    return AffineWeight(_permute_spans(w.weight, lanes_order(w.bits, w.group_size)), w.scales, w.biases, w.bits,
                        w.group_size, lanes=True)


def affine_weight(weight: torch.Tensor, s: AffineScales, dtype: torch.dtype, device: torch.device) -> AffineWeight:
    """Checkpoint tensors -> resident form: words as int32 (torch's shifts want a signed type), scales and
    biases in the compute dtype."""
    return AffineWeight(weight.view(torch.int32).to(device), s.scales.to(device, dtype), s.biases.to(device, dtype),
                        s.bits, s.group_size)


def to_dense(w: AffineWeight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(w.words(), w.format, dtype)


def affine_linear(x: torch.Tensor, w: AffineWeight) -> torch.Tensor:
    """x @ W.T with W dequantized one band of rows at a time (any dtype, any device)."""
    out = w.weight.shape[0]
    if out <= _BAND_ROWS:
        return F.linear(x, to_dense(w, x.dtype))
    return torch.cat([F.linear(x, to_dense(w.rows(r, min(r + _BAND_ROWS, out)), x.dtype))
                      for r in range(0, out, _BAND_ROWS)], dim=-1)


def affine_embed(table: AffineWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Embedding rows of a quantized table, dequantized (mlx-lm quantizes embeddings too)."""
    rows = AffineWeight(table.weight[ids], table.scales[ids], table.biases[ids], table.bits, table.group_size,
                        table.lanes)
    return to_dense(rows, dtype)
