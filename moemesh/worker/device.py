"""Which backend and device a worker serves with (`worker join --backend ... --device ...`), and how much
memory that device offers.

auto picks MLX on its Metal GPU on Apple silicon (where mlx is installed), torch on a CUDA GPU when torch
sees one, else torch on the CPU. A choice this machine cannot run is refused, saying what it lacks."""

from __future__ import annotations

import importlib.util
import platform
import sys

BACKEND_CHOICES = ("auto", "torch", "mlx")
MLX_DEVICES = ("cpu", "gpu")  # gpu: Metal


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None


def choose(backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(backend, device) to serve with; ValueError for a choice this machine cannot run."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKEND_CHOICES)}")
    if backend == "auto":
        backend = "mlx" if device in ("auto", "gpu") and apple_silicon() and _mlx_installed() else "torch"
    if backend == "mlx":
        if not _mlx_installed():
            raise ValueError("backend 'mlx' needs the mlx package: pip install mlx (Linux: pip install 'mlx[cpu]')")
        import mlx.core as mx

        device = {"auto": "gpu" if mx.metal.is_available() else "cpu", "mps": "gpu"}.get(device, device)
        if device not in MLX_DEVICES:
            raise ValueError(f"device '{device}' is not one MLX runs on; choose cpu or gpu (Metal)")
        if device == "gpu" and not mx.metal.is_available():
            raise ValueError("device 'gpu' was requested but MLX sees no Metal GPU on this machine")
        return backend, device
    import torch

    from ..kernels.torch_backend import check_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        raise ValueError("device 'gpu' is MLX's name for Metal; with torch choose cuda, cuda:N or mps")
    check_device(device)
    return backend, device


def device_memory(backend: str, device: str) -> tuple[int, int] | None:
    """(total, free) bytes of a GPU with memory of its own (CUDA); None where the shard lives in the host's
    memory (the CPU, and Apple silicon's unified memory)."""
    if backend == "torch" and device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return total, free
    return None
