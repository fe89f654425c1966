"""Quantized linear weights (FP8 blocks, MLX affine int4/int8) on the torch backend's CPU kernels.

The C++ kernels (csrc/quant.cpp) take a weight as (weight, scales, biases, kind, group_size); `kernel_args`
builds that view — no copy — or says None where they do not apply and torch's ops must serve.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from ..spec.formats import FP8_BLOCK, Kind, affine_kind
from .affine import AffineWeight, affine_linear
from .fp8 import Fp8Weight, fp8_linear

_NONE = torch.empty(0)
_TILE_ROWS = 512  # prefill: rows dequantized to bf16 at once


def kernel_args(w) -> tuple | None:
    if isinstance(w, torch.Tensor):
        return (w, _NONE, _NONE, Kind.BF16, 0) if w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() else None
    if isinstance(w, Fp8Weight):
        return (w.weight.view(torch.uint8), w.scale_inv, _NONE, Kind.FP8, FP8_BLOCK[0]) if w.block == FP8_BLOCK else None
    if isinstance(w, AffineWeight) and w.scales.dtype == torch.bfloat16:
        return w.weight, w.scales, w.biases, affine_kind(w.bits, w.lanes), w.group_size
    return None


def quantized_linear(x: torch.Tensor, w: Fp8Weight | AffineWeight, kernels: ModuleType | None,
                     decode: bool) -> torch.Tensor:
    """x @ W.T: decode steps read the packed weight in one kernel call; longer inputs multiply bf16 tiles of
    W that the kernels dequantize (512 rows at a time); without the kernels, torch dequantizes the tiles."""
    args = kernel_args(w) if kernels is not None and x.dtype == torch.bfloat16 and x.dim() == 2 else None
    if args is None:
        return fp8_linear(x, w) if isinstance(w, Fp8Weight) else affine_linear(x, w)
    if decode:
        return kernels.linear_q(x, args)
    out = w.shape[0]
    return torch.cat([F.linear(x, kernels.dequantize_q(args, r, min(r + _TILE_ROWS, out)))
                      for r in range(0, out, _TILE_ROWS)], dim=-1)
