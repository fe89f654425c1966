"""What a node measures about itself: memory read bandwidth, matmul speed, and the read speed of its decode path."""

from __future__ import annotations

import time

import torch


def _best(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 3) -> float:
    """Bytes/s read by a sum over a buffer much larger than the caches (best of a few passes)."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    return x.nbytes / _best(lambda: (x.sum(), sync()), repeats)


def matmul_flops(dtype: str = "bfloat16", device: str = "cpu", n: int = 1024, repeats: int = 3) -> float:
    """flop/s of a square matmul in the compute dtype."""
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    return 2 * n**3 / _best(lambda: (a @ a, sync()), repeats)


def decode_bandwidth(hidden: int, intermediate: int, dtype: str = "bfloat16", device: str = "cpu",
                     budget: int = 256 << 20, repeats: int = 3) -> float:
    """Bytes/s of weights read by this backend's decode path: SwiGLU MLPs of the model's expert shape on one
    token, over more weights than the caches hold. What a decode step achieves, overheads included."""
    from . import get_backend
    from .base import MlpWeights
    from ..spec.config import args_from_dict

    args = args_from_dict({"model_type": "deepseek_v3", "vocab_size": 1, "hidden_size": hidden,
                           "intermediate_size": intermediate, "num_hidden_layers": 1, "num_attention_heads": 1,
                           "kv_lora_rank": 2, "q_lora_rank": None, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2,
                           "v_head_dim": 2})
    backend = get_backend("torch", args, dtype=dtype, device=device)
    one = 3 * hidden * intermediate * backend.element_size
    mlps = [MlpWeights(*(backend.linear_weight(torch.ones(*shape, dtype=torch.bfloat16), None)
                         for shape in ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))))
            for _ in range(max(2, budget // one))]
    x = torch.ones(1, hidden, device=device).to(mlps[0].gate.dtype)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run() -> None:
        for mlp in mlps:
            backend.mlp(mlp, x)
        sync()

    return one * len(mlps) / _best(run, repeats)
