"""What a node measures about itself, on the backend and device it serves with: memory read bandwidth, matmul
speed, and its decode path's speed on the weights it will hold."""

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


def memory_bandwidth(backend: str = "torch", device: str = "cpu", mib: int = 256, repeats: int = 3) -> float:
    """Bytes/s read by a sum over a buffer much larger than the caches (best of a few passes)."""
    if backend == "mlx":
        import mlx.core as mx

        x = mx.ones(mib * 2**20 // 4, dtype=mx.float32)
        mx.eval(x)
        return x.nbytes / _best(lambda: mx.eval(x.sum()), repeats)
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    return x.nbytes / _best(lambda: (x.sum(), sync()), repeats)


def matmul_flops(dtype: str = "bfloat16", backend: str = "torch", device: str = "cpu", n: int = 1024,
                 repeats: int = 3) -> float:
    """flop/s of a square matmul in the compute dtype."""
    if backend == "mlx":
        import mlx.core as mx

        a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
        mx.eval(a)
        return 2 * n**3 / _best(lambda: mx.eval(a @ a), repeats)
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    return 2 * n**3 / _best(lambda: (a @ a, sync()), repeats)


def decode_profile(hidden: int, intermediate: int, weight_format: str = "bf16", group_size: int = 64,
                   dtype: str = "bfloat16", device: str = "cpu", budget: int = 256 << 20, most: int = 256,
                   repeats: int = 3, backend: str = "torch") -> tuple[float, float]:
    """(bytes/s, flop/s) of `backend`'s decode path on weights held as `weight_format` (bf16, fp32, fp8,
    int4, int8): SwiGLU MLPs of the model's expert shape on one token, over more weights than the caches hold,
    through the code a decode step runs there (the torch kernels at their instruction-set level, MLX's own
    quantized matmul, a GPU's). Bytes are the format's own, scales included, so the planner's
    max(bytes / bandwidth, flops / compute) gives back the time measured. At most `most` MLPs: a model so small
    that more would be needed to fill `budget` decodes from the caches, per-call costs first, as this measures."""
    from . import get_backend
    from ..spec.config import args_from_dict
    from ..spec.formats import FP8_BLOCK
    from .base import MlpWeights
    from .formats import fp8_quantize, quantize

    config = {"model_type": "deepseek_v3", "vocab_size": 1, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": 1, "num_attention_heads": 1, "kv_lora_rank": 2, "q_lora_rank": None,
              "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2}
    if weight_format == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}
    compute = "float32" if weight_format == "fp32" else dtype
    b = get_backend(backend, args_from_dict(config), dtype=compute, device=device)
    gen = torch.Generator().manual_seed(0)

    def stored(out: int, inp: int) -> tuple:  # one weight as a checkpoint stores it in this format
        w = torch.randn(out, inp, generator=gen) * 0.02
        if weight_format == "fp8":
            return fp8_quantize(w, FP8_BLOCK)
        if weight_format in ("int4", "int8"):
            return quantize(w.bfloat16(), int(weight_format[3:]), group_size)
        return w.bfloat16(), None

    # One MLP's stored tensors, then as many resident copies as fill the budget: each is loaded the way a
    # shard's weights are (held in the backend's layout), so decode reads distinct memory every time.
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
    one = [stored(*shape) for shape in shapes]
    first = MlpWeights(*(b.linear_weight(w.clone(), s) for w, s in one))
    per_mlp = sum(_nbytes(w) for w in (first.gate, first.up, first.down))
    mlps = [first] + [MlpWeights(*(b.linear_weight(w.clone(), s) for w, s in one))
                      for _ in range(min(max(1, budget // per_mlp), most) - 1)]
    x = b.from_host(torch.randn(1, hidden, generator=gen).to(getattr(torch, compute)))

    def run() -> None:
        # to_host waits for the work: a GPU's queue drains, and MLX (lazy) computes every MLP's output
        b.to_host(b.concat([b.mlp(mlp, x) for mlp in mlps]))

    seconds = _best(run, repeats)
    return per_mlp * len(mlps) / seconds, 2 * 3 * hidden * intermediate * len(mlps) / seconds


def _nbytes(w) -> int:
    return w.nbytes if hasattr(w, "nbytes") else w.numel() * w.element_size()
