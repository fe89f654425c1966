"""Quantized linear weights (FP8 blocks, MLX affine int4/int8) on the torch backend's CPU kernels.

The C++ kernels (csrc/quant.cpp) take a weight as (weight, scales, biases, kind, group_size); `kernel_args`
builds that view — no copy — or says None where they do not take it. `matmul_args` narrows it to the weights
the decode matmuls multiply at speed: at a vector level (avx2, avx512; `cpu_ext.py`), bf16, FP8 with 128x128
blocks and lane-major affine weights. Every other quantized weight runs `banded_linear`: torch's matmul
on bands of rows dequantized into a reused buffer (`bands.py`) — by the kernels where they are built (any level),
else by torch — so that it costs a matmul plus its conversion, never the kernels' scalar loops.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..spec.formats import FP8_BLOCK, Kind, affine_kind
from .affine import AffineWeight, affine_linear
from .bands import band_rows, banded_linear
from .fp8 import Fp8Weight, fp8_linear

_NONE = torch.empty(0)
_FAST_KINDS = (Kind.BF16, Kind.FP8, Kind.INT4_LANES, Kind.INT8_LANES)


def kernel_args(w) -> tuple | None:
    if isinstance(w, torch.Tensor):
        return (w, _NONE, _NONE, Kind.BF16, 0) if w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() else None
    if isinstance(w, Fp8Weight):
        return (w.weight.view(torch.uint8), w.scale_inv, _NONE, Kind.FP8, FP8_BLOCK[0]) if w.block == FP8_BLOCK else None
    if isinstance(w, AffineWeight) and w.scales.dtype == torch.bfloat16:
        return w.weight, w.scales, w.biases, affine_kind(w.bits, w.lanes), w.group_size
    return None


def vector_level(kernels: ModuleType | None) -> bool:
    """Whether the kernels are vector code (avx2, avx512), which multiplies quantized weights as they are."""
    return kernels is not None and kernels.isa != "scalar"


def matmul_args(w, kernels: ModuleType | None) -> tuple | None:
    """kernel_args(w) where the kernels' decode matmuls multiply w at speed (a vector level, and a bf16, FP8 or
    lane-major weight), else None: torch's matmul serves. The scalar level's plain loops serve none."""
    args = kernel_args(w) if vector_level(kernels) else None
    return args if args is not None and args[3] in _FAST_KINDS else None


def quantized_linear(x: torch.Tensor, w: Fp8Weight | AffineWeight, kernels: ModuleType | None,
                     decode: bool) -> torch.Tensor:
    """x @ W.T: decode steps at a vector level read the packed weight in one kernel call; otherwise torch
    multiplies bands of W that the kernels dequantize (any level), or torch where they are not built."""
    if decode and x.dim() == 2 and matmul_args(w, kernels) is not None and x.dtype == torch.bfloat16:
        return kernels.linear_q(x, kernel_args(w))
    args = kernel_args(w) if kernels is not None and x.dtype == torch.bfloat16 and x.dim() == 2 else None
    if args is None:
        return fp8_linear(x, w) if isinstance(w, Fp8Weight) else affine_linear(x, w)
    return banded_linear(x, w.shape[0], band_rows(x.shape[0], x.shape[1]),
                         lambda start, stop, band: kernels.dequantize_q(args, start, stop, band))
