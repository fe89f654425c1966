"""Quantized weights multiplied by torch: a band of rows at a time dequantized into a reused buffer, then torch's
matmul over it. What serves FP8 and affine weights wherever the CPU kernels' vector matmuls do not (the scalar
level, no kernels, float32 compute, CUDA): a matmul plus the conversion, and no full-size float copy of a weight
ever exists.

A decode step's bands on the CPU are float32, sized for the caches: torch's float32 matrix-vector product over a
band in cache runs about twice as fast as its bf16 one, and the weights keep float32 precision, as in the vector
kernels. Longer inputs' bands are in x's dtype, for its matrix-matrix products.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

_TILE_ROWS = 512  # longer inputs (prefill): rows per band, a matmul's worth of work each
_DECODE_TOKENS = 8  # up to this many tokens, bands are sized for the caches (torch_backend.DECODE_TOKENS)
_BAND_BYTES = 1 << 20  # decode: a band's float32 bytes, what two cores' L2 caches hold
_scratch = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """This thread's buffer `name` of at least numel elements, kept between calls (grown when short)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.device(device))
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def band_rows(tokens: int, in_features: int, multiple: int = 16) -> int:
    """Rows per band: for a decode step as many as fit the caches (a band is written, then read at once), for
    longer inputs 512; a multiple of `multiple` (lane-major spans, FP8 blocks)."""
    rows = _TILE_ROWS if tokens > _DECODE_TOKENS else _BAND_BYTES // (4 * in_features)
    return max(multiple, rows // multiple * multiple)


def band_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for a decode step on the CPU, else x's dtype (see the top of the file)."""
    return torch.float32 if x.device.type == "cpu" and x.numel() // x.shape[-1] <= _DECODE_TOKENS else x.dtype


def banded_linear(x: torch.Tensor, out_features: int, rows: int,
                  fill: Callable[[int, int, torch.Tensor], None]) -> torch.Tensor:
    """x @ W.T for W [out_features, in], made `rows` rows at a time by fill(start, stop, band) into a reused
    buffer of `band_dtype(x)`, each band multiplied by torch."""
    dtype = band_dtype(x)
    xb = x.to(dtype)
    y = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        band = scratch("band", (stop - start) * x.shape[-1], dtype, x.device).view(stop - start, x.shape[-1])
        fill(start, stop, band)
        y[..., start:stop] = xb @ band.T
    return y
