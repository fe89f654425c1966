"""MLX affine int4/int8 weights (docs/formats.md; packing and quantizing in `formats.py`) on the torch backend.

They stay packed in memory. Decode steps run our C++ kernel (csrc/quant.cpp) where it is vector code,
which multiplies the packed values directly; everything else dequantizes a band of rows at a time into a
reused buffer and calls torch's matmul (`bands.py`), so no full-size float copy of the weight ever exists.
Where that kernel runs, the torch backend holds the weights in a lane-major order (`to_lanes`): the same
words, transposed within each span of 16 groups, so that the kernel applies a span's 16 scales once instead
of permuting them per chunk; `words` gives them back in MLX order.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from .bands import band_rows, banded_linear, scratch
from .formats import AffineScales, dequantize


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
        groups = self.scales.shape[-1]
        if self.lanes and (start * groups % 16 or (stop < self.weight.shape[0] and stop * groups % 16)):
            raise ValueError(f"rows {start}..{stop} of a lane-major weight of {groups} groups per row cut a 16-group span")
        return AffineWeight(self.weight[start:stop], self.scales[start:stop], self.biases[start:stop], self.bits,
                            self.group_size, self.lanes)

    def words(self) -> torch.Tensor:
        """The packed words in MLX's order."""
        return _transpose_spans(self.weight, self.bits, self.group_size, to_lanes=False) if self.lanes else self.weight


def _transpose_spans(words: torch.Tensor, bits: int, group_size: int, to_lanes: bool) -> torch.Tensor:
    """The lane-major layout (docs/formats.md, csrc/quant.h): the weight's groups, row after row, cut into spans
    of 16; in each span the 32-bit words held as [16 groups, words per group] in MLX's order are held transposed,
    so that the 16 words of every 64-byte chunk (one fp32 lane each) come one from each group. A span may cross
    rows."""
    per_group = group_size * bits // 32
    spans = words.contiguous().view(-1, 16, per_group) if to_lanes else words.contiguous().view(-1, per_group, 16)
    return spans.transpose(1, 2).contiguous().view(words.shape)


def _lanes_rows(w: AffineWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a lane-major weight's words, in MLX's order: each word gathered from where its span put it."""
    per_group, row_words = w.group_size * w.bits // 32, w.weight.shape[1]
    flat = ids.to(w.weight.device)[:, None] * row_words + torch.arange(row_words, device=w.weight.device)
    span, in_span = flat // (16 * per_group), flat % (16 * per_group)
    at = span * 16 * per_group + in_span % per_group * 16 + in_span // per_group
    return w.weight.view(-1)[at]


def lanes_fit(w: AffineWeight) -> bool:
    """Whether w can take the lane-major layout: bf16 scales (the kernels'), whole 16-group spans."""
    return (not w.lanes and w.bits in (4, 8) and w.scales.dtype == torch.bfloat16 and w.weight.dim() == 2
            and w.weight.is_contiguous() and w.scales.numel() % 16 == 0)


def to_lanes(w: AffineWeight, kernels: ModuleType | None = None, out: torch.Tensor | None = None) -> AffineWeight:
    """A copy of w in the lane-major layout (for the decode kernel; the same words, transposed per span), into
    `out` if given: by the CPU kernels' parallel copy where given (a load's cost), else by torch."""
    if kernels is None:
        words = _transpose_spans(w.weight, w.bits, w.group_size, to_lanes=True)
        words = words if out is None else out.copy_(words)
    else:
        words = torch.empty_like(w.weight) if out is None else out
        kernels.to_lanes_q(w.weight, w.bits, w.group_size, words)
    return AffineWeight(words, w.scales, w.biases, w.bits, w.group_size, lanes=True)


def affine_weight(weight: torch.Tensor, s: AffineScales, dtype: torch.dtype, device: torch.device) -> AffineWeight:
    """Checkpoint tensors -> resident form: words as int32 (torch's shifts want a signed type), scales and
    biases in the compute dtype."""
    return AffineWeight(weight.view(torch.int32).to(device), s.scales.to(device, dtype), s.biases.to(device, dtype),
                        s.bits, s.group_size)


def to_dense(w: AffineWeight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(w.words(), w.format, dtype)


def dequantize_into(w: AffineWeight, out: torch.Tensor) -> None:
    """out [rows, in] = w dequantized as `dequantize` does it (q * s + b in float32, rounded once to out's dtype),
    through this thread's reused scratch rather than fresh temporaries."""
    words = w.words()
    rows, per_word, g = words.shape[0], 32 // w.bits, w.group_size
    q = scratch("q", words.numel() * per_word, torch.int32, words.device).view(rows, -1, per_word)
    torch.bitwise_right_shift(words.unsqueeze(-1), _shifts(w.bits, words.device), out=q)
    q.bitwise_and_((1 << w.bits) - 1)
    f = scratch("f", q.numel(), torch.float32, words.device).view(rows, -1, g)
    f.copy_(q.view(rows, -1, g))
    f.mul_(w.scales.unsqueeze(-1)).add_(w.biases.unsqueeze(-1))
    out.view(rows, -1, g).copy_(f)


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def affine_linear(x: torch.Tensor, w: AffineWeight) -> torch.Tensor:
    """x @ W.T with W dequantized one band of rows at a time into a reused buffer (any dtype, any device)."""
    return banded_linear(x, w.shape[0], band_rows(x.numel() // x.shape[-1], x.shape[-1]),
                         lambda start, stop, band: dequantize_into(w.rows(start, stop), band))


def affine_embed(table: AffineWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Embedding rows of a quantized table, dequantized (mlx-lm quantizes embeddings too)."""
    words = _lanes_rows(table, ids) if table.lanes else table.weight[ids]
    return dequantize(words, AffineScales(table.scales[ids], table.biases[ids], table.bits, table.group_size), dtype)
