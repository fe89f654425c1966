"""Cluster decode speed on loopback: 1, 2 and 4 worker processes (an even pipeline split) against the
single-node engine on the same memory-bound checkpoint, the per-hop latency of a decode step's hidden
state, and the live planner's prediction beside each measurement (from the workers' own profiles).

`python bench/cluster.py [--format bf16|int4] [--isa avx512 avx2]` -> JSON. With several ISA levels, every
process of each measurement runs the CPU kernels built for that level (MOEMESH_CPU_ISA), in the same run.

`python bench/cluster.py --backends mlx torch torch` instead measures mixed backends: the single-node decode
rate of each backend named (on this CPU, in the same run), then one cluster of workers with those backends,
placed by the planner (`--split`, default auto) from their own profiles: measured against predicted."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BENCH_CONFIG, bench_checkpoint, save  # noqa: E402

import moemesh  # noqa: E402
from moemesh.launch import LocalCluster  # noqa: E402

PROMPT = list(range(100, 164))  # 64 tokens


def decode_rate(model, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Best decode and prefill tokens/s over a few greedy generations."""
    model.generate(PROMPT, max_new_tokens=8)  # warm up
    decode, prefill = 0.0, 0.0
    for _ in range(repeats):
        model.generate(PROMPT, max_new_tokens=new_tokens)
        decode = max(decode, model.last_stats.decode_tokens_per_s)
        prefill = max(prefill, model.last_stats.prefill_tokens_per_s)
    return decode, prefill


def checkpoint(root: Path, fmt: str) -> Path:
    path = bench_checkpoint(root / "bf16")
    if fmt == "int4" and not (root / "int4" / "config.json").exists():
        from moemesh.quantize import Recipe, convert

        convert(path, root / "int4", Recipe(bits=4, group_size=64))
    return path if fmt == "bf16" else root / "int4"


def single_node(path: Path, opts, isa: str, backend: str = "torch") -> tuple[float, float]:
    """The single-node engine's decode and prefill rates on `backend`, in a subprocess built for `isa`."""
    import subprocess

    code = ("import json, sys; sys.path.insert(0, %r); import cluster as b, moemesh; "
            "e = moemesh.load(%r, dtype=%r, backend=%r); print(json.dumps(b.decode_rate(e, %d, %d)))"
            % (str(Path(__file__).parent), str(path), opts.dtype, backend, opts.tokens, opts.repeats))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | ({"MOEMESH_CPU_ISA": isa} if isa else {}), timeout=1800)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--format", choices=("bf16", "int4"), default="bf16", help="checkpoint format (int4: g64)")
    ap.add_argument("--isa", nargs="+", default=[""], help="CPU kernel levels to measure (default: the best)")
    ap.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench-ckpt")
    ap.add_argument("--backends", nargs="+", choices=("torch", "mlx"), help="one worker per entry: mixed backends")
    ap.add_argument("--split", default="auto", help="with --backends: the coordinator's --split")
    opts = ap.parse_args()
    path = checkpoint(opts.checkpoint, opts.format)
    if opts.backends:
        out = save("cluster_backends", {"checkpoint": BENCH_CONFIG, "dtype": opts.dtype, "format": opts.format,
                                        **measure_backends(path, opts)})
        print(f"wrote {out}")
        return
    results = {isa or "default": measure(path, opts, isa) for isa in opts.isa}
    out = save("cluster", {"checkpoint": BENCH_CONFIG, "dtype": opts.dtype, "format": opts.format, "runs": results})
    print(f"wrote {out}")


def measure(path: Path, opts, isa: str) -> dict:
    single, single_prefill = single_node(path, opts, isa)
    print(f"[{isa or 'default'} kernels, {opts.format}] single node: decode {single:.1f} tok/s, "
          f"prefill {single_prefill:.1f} tok/s")
    rows = []
    for n in opts.nodes:
        with tempfile.TemporaryDirectory() as logs:
            cluster = LocalCluster(path, n, Path(logs), ["--split", "even", "--dtype", opts.dtype],
                                   env={"MOEMESH_CPU_ISA": isa} if isa else None)
            try:
                model = cluster.wait_ready(nodes=n)
                decode, prefill = decode_rate(model, opts.tokens, opts.repeats)
                time.sleep(0.5)
                s = model.status()
                plan = json.loads(s.plan_json)
                rows.append({"nodes": n, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
                             "vs_single_node": decode / single, "hop_ms_median": s.hop_ms_median,
                             "hop_ms_p99": s.hop_ms_p99, "predicted_tokens_per_s": plan["tokens_per_s"],
                             "measured_over_predicted": decode / plan["tokens_per_s"],
                             "stages": [(st["lead"], st["start"], st["end"]) for st in plan["stages"]]})
                model.close()
            finally:
                cluster.close()
        r = rows[-1]
        print(f"{n} node(s): decode {r['decode_tokens_per_s']:.1f} tok/s = {r['vs_single_node']:.0%} of single node; "
              f"hop median {r['hop_ms_median']:.3f} ms, p99 {r['hop_ms_p99']:.3f} ms; planner predicted "
              f"{r['predicted_tokens_per_s']:.1f} tok/s (measured/predicted {r['measured_over_predicted']:.2f})")
    return {"single_node_decode_tokens_per_s": single, "single_node_prefill_tokens_per_s": single_prefill,
            "clusters": rows}


def measure_backends(path: Path, opts) -> dict:
    single = {b: single_node(path, opts, "", b)[0] for b in sorted(set(opts.backends))}
    print("single node decode: " + ", ".join(f"{b} {rate:.1f} tok/s" for b, rate in single.items()))
    with tempfile.TemporaryDirectory() as logs:
        cluster = LocalCluster(path, 0, Path(logs), ["--split", opts.split, "--dtype", opts.dtype,
                                                     "--expect", str(len(opts.backends))])
        try:
            for i, backend in enumerate(opts.backends):
                cluster.add_worker(f"{backend}{i + 1}", ["--coordinator", cluster.target, "--backend", backend,
                                                         "--device", "cpu"])
            model = cluster.wait_ready(timeout=900)
            decode, _ = decode_rate(model, opts.tokens, opts.repeats)
            s = model.status()
            plan = json.loads(s.plan_json)
            profiles = {n.info.name: {"backend": f"{n.info.backend}/{n.info.device}", "decode_bandwidth": n.decode_bandwidth,
                                      "decode_flops": n.decode_flops, "layers": list(n.layers), "experts": n.experts}
                        for n in s.nodes}
            model.close()
        finally:
            cluster.close()
    print(f"cluster {' '.join(opts.backends)}: decode {decode:.1f} tok/s, planner predicted "
          f"{plan['tokens_per_s']:.1f} (measured/predicted {decode / plan['tokens_per_s']:.2f}); "
          + "; ".join(f"{name} ({p['backend']}): decode reads {p['decode_bandwidth'] / 1e9:.2f} GB/s, layers "
                      f"{p['layers'] or '-'}, {p['experts']} experts" for name, p in profiles.items()))
    return {"single_node_decode_tokens_per_s": single, "cluster_decode_tokens_per_s": decode,
            "predicted_tokens_per_s": plan["tokens_per_s"], "measured_over_predicted": decode / plan["tokens_per_s"],
            "stages": [(st["lead"], st["start"], st["end"], st["helpers"]) for st in plan["stages"]], "nodes": profiles}


if __name__ == "__main__":
    main()
