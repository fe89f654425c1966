"""Backends: the DeepSeek-V3 math per array library. See `base.py` for the interface."""

from __future__ import annotations

from ..spec.config import ModelArgs
from .base import Backend

BACKENDS = ("torch", "mlx")


def get_backend(name: str, args: ModelArgs, dtype: str = "bfloat16", device: str = "cpu") -> Backend:
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(args, dtype=dtype, device=device)
    if name == "mlx":
        try:
            from .mlx_backend import MlxBackend
        except ImportError as e:
            raise ValueError(f"backend 'mlx' needs the mlx package ({e}); pip install mlx (Linux: mlx[cpu])") from None
        return MlxBackend(args, dtype=dtype, device=device)
    raise ValueError(f"backend '{name}' is not available; choose one of: {', '.join(BACKENDS)}")
