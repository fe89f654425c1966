"""What a node measures about itself on joining: memory read bandwidth and matmul speed."""

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
