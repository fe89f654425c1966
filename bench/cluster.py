"""Cluster decode speed on loopback: 1, 2 and 4 worker processes (an even pipeline split) against the
single-node engine on the same memory-bound checkpoint, the per-hop latency of a decode step's hidden
state, and the planner's prediction beside each measurement. `python bench/cluster.py` -> JSON."""

from __future__ import annotations

import argparse
import gc
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench-ckpt")
    opts = ap.parse_args()
    path = bench_checkpoint(opts.checkpoint)

    engine = moemesh.load(path, dtype=opts.dtype)
    single, single_prefill = decode_rate(engine, opts.tokens, opts.repeats)
    del engine
    gc.collect()
    print(f"single node: decode {single:.1f} tok/s, prefill {single_prefill:.1f} tok/s")

    rows = []
    for n in opts.nodes:
        with tempfile.TemporaryDirectory() as logs:
            cluster = LocalCluster(path, n, Path(logs), ["--split", "even", "--dtype", opts.dtype])
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
    out = save("cluster", {"checkpoint": BENCH_CONFIG, "dtype": opts.dtype, "single_node_decode_tokens_per_s": single,
                           "single_node_prefill_tokens_per_s": single_prefill, "clusters": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
