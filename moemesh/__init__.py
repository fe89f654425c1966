"""moemesh: DeepSeek-V3-class MoE inference across the machines you already own."""

from __future__ import annotations

__version__ = "0.1.0"

def load(path, backend: str = "torch", dtype: str = "bfloat16", device: str = "cpu", **kwargs):
    """Load a checkpoint directory for inference on this machine; see `moemesh.model.engine.Engine`."""
    from .model.engine import Engine  # torch is imported only when a model is loaded

    return Engine.load(path, backend=backend, dtype=dtype, device=device, **kwargs)

def connect(target: str, timeout: float = 30.0):
    """A model served by a moemesh cluster: `target` is the coordinator's HOST:PORT."""
    from .client import ClusterModel

    return ClusterModel(target, timeout=timeout)
