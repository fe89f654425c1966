"""Shared by the benchmarks: the memory-bound checkpoint they build, the read-bandwidth measurement
that defines the floor, and where results go."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from moemesh.demo import DEMO_CONFIG, write_random_checkpoint
from moemesh.kernels.cpu_ext import ISA_LEVELS, requested_isa
from moemesh.spec.config import args_from_dict
from moemesh.spec.sizes import model_sizes, weight_format

RESULTS = Path(__file__).parent / "results"
# --isa: a CPU kernel level (MOEMESH_CPU_ISA), or "torch": no kernels (MOEMESH_CPU_KERNELS=0), torch's ops alone.
ISA_CHOICES = (*ISA_LEVELS, "torch")

# hidden 1024, 8 layers (1 dense + 7 MoE), 32 experts top-4 + 1 shared: a few hundred MB read per token,
# far more than the caches hold, so decoding is bound by memory bandwidth.
BENCH_CONFIG = DEMO_CONFIG | dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
    first_k_dense_replace=1, num_nextn_predict_layers=0, eos_token_id=None, max_position_embeddings=2048,
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 512, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})

# The same per-token make-up as DeepSeek-V3 at a smaller size: V3's head dims (nope 128, rope 64, v 128),
# 8 routed + 1 shared experts per token out of 8 groups, and an lm_head that is a small share of the bytes
# read (6% here, 2.5% in V3; 27% in BENCH_CONFIG). ~530 MB read per token in bf16, 1.5 GB of weights:
# per-layer fixed costs are small beside the weight reads, as they are in the real model.
V3_SHAPED_CONFIG = BENCH_CONFIG | dict(
    vocab_size=8192, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=32, num_experts_per_tok=8, n_group=8, topk_group=4)


def bench_checkpoint(path: Path, config: dict = BENCH_CONFIG) -> Path:
    if not (path / "config.json").exists() or json.loads((path / "config.json").read_text()) != config:
        write_random_checkpoint(path, config, seed=0, shards=4)
    return path


def active_bytes_per_token(config: dict, bytes_per_param: int = 2) -> int:
    """Weights read to decode one token (the planner's byte accounting): attention, dense MLP or router +
    shared + top_k routed experts, norms, lm_head and one embedding row, in bf16 (2) or float32 (4)."""
    return model_sizes(args_from_dict(config), weight_format("fp32" if bytes_per_param == 4 else "bf16")).read_bytes_per_token


def read_bandwidth(threads: int = 2, repeats: int = 5) -> float:
    """Bytes/s: the best of a few `threads`-thread sums over a 512 MiB tensor."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(512 * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    torch.set_num_threads(before)
    return x.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def add_isa_option(ap) -> None:
    ap.add_argument("--isa", nargs="+", choices=ISA_CHOICES, default=None,
                    help="CPU kernel levels to measure, each in its own processes, in one run (default: the level "
                         "this machine picks); 'torch' = no kernels")


def isa_levels(chosen: list[str] | None) -> list[str]:
    return chosen or [requested_isa()]


def isa_env(level: str) -> dict[str, str]:
    """The environment of a measuring subprocess at `level`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MOEMESH_CPU_ISA", "MOEMESH_CPU_KERNELS")}
    return env | ({"MOEMESH_CPU_KERNELS": "0"} if level == "torch" else {"MOEMESH_CPU_ISA": level})


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}, **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
