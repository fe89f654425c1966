"""moemesh: DeepSeek-V3-class MoE inference across the machines you already own."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def builtin_model() -> Path:
    """The directory of the built-in model: a small DeepSeek-V3 trained on the Python standard library by
    `moemesh train-demo`, shipped with the package (see its README.md)."""
    path = Path(__file__).parent / "builtin"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: the built-in model is missing from this installation; "
                                "rebuild it with `moemesh train-demo --out DIR` and pass --model DIR")
    return path


def load(path, backend: str = "torch", dtype: str = "bfloat16", device: str = "cpu", **kwargs):
    """Load a checkpoint directory for inference on this machine; see `moemesh.model.engine.Engine`."""
    from .model.engine import Engine  # torch is imported only when a model is loaded

    return Engine.load(path, backend=backend, dtype=dtype, device=device, **kwargs)

def connect(target: str, timeout: float = 30.0):
    """A model served by a moemesh cluster: `target` is the coordinator's HOST:PORT."""
    from .client import ClusterModel

    return ClusterModel(target, timeout=timeout)
