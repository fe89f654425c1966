"""Single-node speed on one memory-bound checkpoint, in one run: moemesh vs transformers' `generate` vs
mlx-lm's `generate` (the engine exo runs on), same dtype and threads; decode and prefill tokens/s, and
decode as a share of the floor = this machine's read bandwidth / weight bytes read per token.
`python bench/single_node.py [--isa avx2 avx512]` -> bench/results/single_node.json; moemesh runs in a subprocess per
CPU kernel level given (MOEMESH_CPU_ISA; 'torch': no kernels), all in the same run."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_CONFIG, active_bytes_per_token, add_isa_option, bench_checkpoint, isa_env,  # noqa: E402
                    isa_levels, read_bandwidth, save)

import moemesh  # noqa: E402


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_moemesh(path: Path, dtype: str, prompt: list[int], new: int, repeats: int) -> dict:
    engine = moemesh.load(path, dtype=dtype)

    def prefill():
        engine.step_fn(engine.new_cache())(prompt, 0)

    def decode():
        step = engine.step_fn(engine.new_cache())
        step(prompt, 0)
        t0 = time.perf_counter()
        for i in range(new):
            step([7], len(prompt) + i)
        return time.perf_counter() - t0

    prefill_s = best(prefill, repeats)
    decode()
    decode_s = min(decode() for _ in range(repeats))
    from moemesh.kernels.cpu_ext import cpu_isa

    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": new / decode_s,
            "kernels": cpu_isa() if engine.backend.kernels is not None else "torch"}


def bench_moemesh_at(level: str, opts, dtype: str) -> dict:
    """bench_moemesh in a subprocess whose kernels are `level`'s."""
    run = subprocess.run([sys.executable, __file__, "--prompt", str(opts.prompt), "--tokens", str(opts.tokens),
                          "--repeats", str(opts.repeats), "--threads", str(opts.threads), "--checkpoint",
                          str(opts.checkpoint), "--measure", dtype], capture_output=True, text=True, env=isa_env(level))
    if run.returncode:
        raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_transformers(path: Path, dtype: str, prompt: list[int], new: int, repeats: int) -> dict:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill_s = best(lambda: model(ids, logits_to_keep=1), repeats)  # as generate() runs it
        gen = lambda: model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False)  # noqa: E731
        total = best(gen, repeats)
    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": new / max(total - prefill_s, 1e-9),
            "experts_implementation": model.config._experts_implementation}


def bench_mlx_lm(path: Path, dtype: str, prompt: list[int], new: int, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    mx.set_default_device(mx.cpu)
    model, tokenizer = load(str(path))
    model.set_dtype({"bfloat16": mx.bfloat16, "float32": mx.float32}[dtype])
    out = {}
    for _ in range(repeats + 1):
        last = None
        for last in stream_generate(model, tokenizer, prompt=prompt, max_tokens=new + 1):
            pass
        out = {"prefill_tokens_per_s": max(out.get("prefill_tokens_per_s", 0), last.prompt_tps),
               "decode_tokens_per_s": max(out.get("decode_tokens_per_s", 0), last.generation_tps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench-ckpt")
    add_isa_option(ap)
    ap.add_argument("--measure", metavar="DTYPE", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    path = bench_checkpoint(opts.checkpoint)
    prompt = list(range(100, 100 + opts.prompt))
    if opts.measure:
        print(json.dumps(bench_moemesh(path, opts.measure, prompt, opts.tokens, opts.repeats)))
        return
    engines = [(f"moemesh {level}", lambda p, d, pr, n, r, level=level: bench_moemesh_at(level, opts, d))
               for level in isa_levels(opts.isa)]
    bandwidth = read_bandwidth(opts.threads)  # measured again at the end: the floor uses the better one
    runs = {}
    for dtype in opts.dtypes:
        size = {"bfloat16": 2, "float32": 4}[dtype]
        active = active_bytes_per_token(BENCH_CONFIG, size)
        floor = bandwidth / active
        print(f"\n{dtype}: {active / 1e6:.0f} MB of weights read per token; read bandwidth {bandwidth / 1e9:.1f} GB/s "
              f"-> floor {floor:.1f} tokens/s")
        rows = {}
        for name, fn in [*engines, ("transformers", bench_transformers), ("mlx-lm", bench_mlx_lm)]:
            try:
                rows[name] = fn(path, dtype, prompt, opts.tokens, opts.repeats)
            except Exception as e:  # a baseline that cannot run this model is reported, not fatal
                rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                traceback.print_exc(limit=1)
            gc.collect()
        base = rows["transformers"].get("decode_tokens_per_s")
        base_prefill = rows["transformers"].get("prefill_tokens_per_s")
        for name, r in rows.items():
            if "error" in r:
                print(f"  {name:16s} could not run: {r['error']}")
                continue
            r["decode_share_of_floor"] = r["decode_tokens_per_s"] / floor
            if base:
                r["decode_vs_transformers"] = r["decode_tokens_per_s"] / base
                r["prefill_vs_transformers"] = r["prefill_tokens_per_s"] / base_prefill
            print(f"  {name:16s} decode {r['decode_tokens_per_s']:7.1f} tok/s ({r['decode_share_of_floor']:.0%} of floor, "
                  f"{r.get('decode_vs_transformers', 0):.2f}x transformers) | prefill {r['prefill_tokens_per_s']:7.1f} "
                  f"tok/s ({r.get('prefill_vs_transformers', 0):.2f}x transformers)")
        runs[dtype] = {"active_bytes_per_token": active, "floor_tokens_per_s": floor, "engines": rows}
    after = read_bandwidth(opts.threads)
    if after > bandwidth:
        print(f"\nread bandwidth measured again at the end: {after / 1e9:.1f} GB/s (the floor above used "
              f"{bandwidth / 1e9:.1f}); shares of floor at the higher figure:")
        for dtype, run in runs.items():
            for name, r in run["engines"].items():
                if "decode_tokens_per_s" in r:
                    r["decode_share_of_floor_at_best_bandwidth"] = r["decode_tokens_per_s"] * run["active_bytes_per_token"] / after
                    print(f"  {dtype} {name:16s} {r['decode_share_of_floor_at_best_bandwidth']:.0%}")
    out = save("single_node", {"checkpoint": BENCH_CONFIG, "read_bandwidth": bandwidth,
                               "read_bandwidth_at_end": after, "prompt_tokens": opts.prompt,
                               "new_tokens": opts.tokens, "runs": runs})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
