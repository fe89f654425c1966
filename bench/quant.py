"""Compact weights, per format (bf16, fp8, int8, int4), in one run on one memory-bound checkpoint:
weight bytes in memory (and the resident memory loading and decoding added — the checkpoint's mapped pages
plus all new anonymous memory — against the checkpoint's bytes), decode
matmul throughput on a 4096x4096 weight, model decode tokens/s, and top-1 / KL of the logits against bf16.
Writes bench/results/quant.json and prints ratios against bf16: decode speed against bf16 is the median over
rounds of each round's own ratio, since a machine's memory bandwidth can drift between rounds. Decode's share of
the floor: tokens/s against the read bandwidth measured in the run over the format's bytes read per token.

    python bench/quant.py [--threads 2] [--tokens 64] [--rounds 3] [--config v3-shaped|small] [--isa avx2 avx512]

--isa measures each CPU kernel level given (MOEMESH_CPU_ISA; 'torch': no kernels) in the same run: every round
runs each level's formats back to back, so each level's ratios pair runs that saw one machine state.

The default checkpoint has DeepSeek-V3's per-token make-up (bench/common.py: V3_SHAPED_CONFIG); `small` is
the single-node benchmark's, whose small layers and large lm_head make fixed per-layer costs and the
unquantized FP8 lm_head weigh more than in any real model. Each format is measured in a fresh subprocess,
so resident memory is that format's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_CONFIG, V3_SHAPED_CONFIG, active_bytes_per_token, add_isa_option, isa_env,  # noqa: E402
                    isa_levels, read_bandwidth)

from moemesh.demo import write_random_checkpoint  # noqa: E402
from moemesh.kernels.formats import fp8_quantize  # noqa: E402
from moemesh.spec.formats import FP8_BLOCK  # noqa: E402

CONFIGS = {"v3-shaped": V3_SHAPED_CONFIG, "small": BENCH_CONFIG}
FORMATS = ("bf16", "fp8", "int8", "int4")
PROMPT = list(range(100, 116))
EVAL = (6, 50)  # sequences x tokens for top-1 / KL: 300 positions


# ---- checkpoints
def write_fp8(src: Path, dst: Path) -> None:
    """The official format: e4m3 weights, float32 scale_inv per 128x128 block (amax / 448), for the linear
    weights inside the layers (not the router, norms, embedding or lm_head)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for file in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in load_file(src / file).items():
            out[name] = t
            if t.dim() == 2 and ".layers." in name and "mlp.gate.weight" not in name:
                out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = fp8_quantize(t, FP8_BLOCK)
        save_file(out, dst / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(out, file)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))


def checkpoints(root: Path, config: dict) -> dict[str, Path]:
    from moemesh.quantize import Recipe, convert

    paths = {fmt: root / fmt for fmt in FORMATS}
    if not (paths["bf16"] / "config.json").exists():
        write_random_checkpoint(paths["bf16"], config, seed=0, shards=4)
    if not (paths["fp8"] / "config.json").exists():
        write_fp8(paths["bf16"], paths["fp8"])
    for bits in (8, 4):
        if not (paths[f"int{bits}"] / "config.json").exists():
            convert(paths["bf16"], paths[f"int{bits}"], Recipe(bits=bits, group_size=64))
    return paths


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---- one format, in its own process
def rss(checkpoint: Path) -> dict[str, int]:
    """Resident bytes: the checkpoint's memory-mapped file pages, all anonymous memory (copies, activations,
    caches), and all file pages (which also count library code the first forward pass pages in)."""
    out = {"checkpoint_pages": 0}
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[0].isupper():  # a mapping's header: address range, perms, ..., path
            mapping = line.split()[-1] if len(line.split()) >= 6 else None
        elif line.startswith("Rss:") and mapping and mapping.startswith(str(checkpoint.resolve())):
            out["checkpoint_pages"] += int(line.split()[1]) * 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssFile:", "RssAnon:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def growth(before: dict[str, int], checkpoint: Path) -> dict[str, int]:
    """What loading and running the model added; `model` = its checkpoint pages + all new anonymous memory."""
    now = rss(checkpoint)
    grown = {k: now[k] - before[k] for k in now}
    return grown | {"model": grown["checkpoint_pages"] + grown["RssAnon"]}


def matmul_throughput(fmt: str, args, reps: int = 20) -> dict:
    """y = x @ W.T for one bf16 token through the backend's decode path, over 6 different 4096x4096 weights
    in turn (at least 56 MB, more than the last-level cache: the weights come from memory, as in decode)."""
    from moemesh.kernels.fp8 import Fp8Weight
    from moemesh.kernels.torch_backend import TorchBackend
    from moemesh.kernels.formats import quantize

    backend = TorchBackend(args, "bfloat16")
    weights = []
    for seed in range(6):
        w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(seed)) * 0.02
        if fmt == "bf16":
            weights.append(w.bfloat16())
        elif fmt == "fp8":
            weights.append(Fp8Weight(*fp8_quantize(w, FP8_BLOCK), FP8_BLOCK))
        else:
            words, s = quantize(w.bfloat16(), int(fmt[3:]), 64)
            weights.append(backend.linear_weight(words, s))  # as the model holds it (lane-major, see docs)
    x = torch.randn(1, 4096).bfloat16()
    for weight in weights:
        backend.linear(x, weight)
    start = time.perf_counter()
    for _ in range(reps):
        for weight in weights:
            backend.linear(x, weight)
    seconds = (time.perf_counter() - start) / reps / len(weights)
    nbytes = weights[0].nbytes
    return {"us": seconds * 1e6, "GB_per_s": nbytes / seconds / 1e9, "G_weights_per_s": 4096**2 / seconds / 1e9,
            "bytes": nbytes}


def measure(fmt: str, path: Path, tokens: int, reference: Path) -> dict:
    import numpy as np

    import moemesh
    from moemesh.kernels.cpu_ext import cpu_isa
    from moemesh.spec.sizes import model_sizes, weight_format

    kernels = cpu_isa()  # built (or loaded) before the memory baseline, as are the modules loading imports
    import moemesh.model.engine  # noqa: F401
    before = rss(path)
    engine = moemesh.load(path, dtype="bfloat16")
    sizes = model_sizes(engine.args, weight_format(fmt, engine.args, group_size=64))
    engine.generate(PROMPT, max_new_tokens=4)  # warm up
    rates = []
    for _ in range(3):
        engine.generate(PROMPT, max_new_tokens=tokens)
        rates.append(engine.last_stats.decode_tokens_per_s)
    grown = growth(before, path)  # weights (every expert has been used by now) and decode's working set
    ids = torch.randint(0, engine.args.vocab_size, EVAL, generator=torch.Generator().manual_seed(1))
    logits = engine.logits(ids).float()
    result = {"format": fmt, "kernels": kernels or "torch", "weight_bytes": engine.weight_bytes,
              "planner_bytes": sizes.weight_bytes, "read_bytes_per_token": sizes.read_bytes_per_token,
              "checkpoint_bytes": checkpoint_bytes(path), "rss_growth_bytes": grown,
              "rss_growth_after_300_position_prefill_bytes": growth(before, path),
              "decode_tokens_per_s": max(rates), "matmul_4096": matmul_throughput(fmt, engine.args)}
    if fmt == "bf16":  # the reference; and its own distance from float32, the noise floor of these figures
        np.save(reference, logits.numpy())
        del engine
        result["top1_vs_bf16"], result["kl_vs_bf16"] = agreement(
            moemesh.load(path, dtype="float32").logits(ids).float(), logits)
    else:
        result["top1_vs_bf16"], result["kl_vs_bf16"] = agreement(torch.from_numpy(np.load(reference)), logits)
    return result


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || logits) over all positions."""
    p = reference.log_softmax(-1)
    top1 = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return top1, (p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean().item()


def torch_alternatives(reps: int = 100) -> dict:
    """torch's own quantized CPU matmuls on the same 4096x4096 single-token product, for comparison."""
    x, out = torch.randn(1, 4096).bfloat16(), {}
    ops = {
        "aten._weight_int8pack_mm (int8, per channel)": (
            torch.ops.aten._weight_int8pack_mm,
            (x, torch.randint(-128, 127, (4096, 4096), dtype=torch.int8), torch.rand(4096).bfloat16()), 4096 * 4096),
        "aten._weight_int4pack_mm_for_cpu (int4, group 128)": (
            torch.ops.aten._weight_int4pack_mm_for_cpu,
            (x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (4096, 4096), dtype=torch.int32), 2),
             128, torch.rand(32, 4096, 2).bfloat16()), 4096 * 4096 // 2),
    }
    for name, (op, args, nbytes) in ops.items():
        try:
            for _ in range(5):
                op(*args)
            start = time.perf_counter()
            for _ in range(reps):
                op(*args)
            seconds = (time.perf_counter() - start) / reps
            out[name] = {"us": seconds * 1e6, "GB_per_s": nbytes / seconds / 1e9, "G_weights_per_s": 4096**2 / seconds / 1e9}
        except (RuntimeError, NotImplementedError) as e:
            out[name] = {"error": str(e).splitlines()[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="each format's decode speed is its best round")
    ap.add_argument("--config", choices=CONFIGS, default="v3-shaped", help="the checkpoint's shape (see above)")
    ap.add_argument("--dir", type=Path, default=None, help="where the checkpoints are built (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant.json")
    add_isa_option(ap)
    ap.add_argument("--measure", nargs=3, metavar=("FORMAT", "PATH", "REFERENCE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.measure:
        fmt, path, reference = a.measure
        print(json.dumps(measure(fmt, Path(path), a.tokens, Path(reference))))
        return
    levels = isa_levels(a.isa)
    bandwidth = [read_bandwidth(a.threads)]  # and again at the end: the floor takes the better one
    with tempfile.TemporaryDirectory() as tmp:
        root = (a.dir or Path(tmp)) / a.config
        paths = checkpoints(root, CONFIGS[a.config])
        reference = root / "bf16_logits.npy"
        results = {level: {} for level in levels}
        rates = {level: {fmt: [] for fmt in FORMATS} for level in levels}
        for round in range(a.rounds):  # levels and formats interleaved: memory bandwidth can drift over minutes
            for level in levels:
                for fmt in FORMATS:
                    run = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--tokens", str(a.tokens),
                                          "--measure", fmt, str(paths[fmt]), str(reference)],
                                         capture_output=True, text=True, check=True, env=isa_env(level))
                    result = json.loads(run.stdout.strip().splitlines()[-1])
                    rates[level][fmt].append(result["decode_tokens_per_s"])
                    results[level].setdefault(fmt, result)
                    print(f"round {round + 1}: {level} {fmt} {result['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    bandwidth.append(read_bandwidth(a.threads))
    floor_bandwidth = max(bandwidth)
    for level in levels:
        for fmt in FORMATS:  # each format's best round; its speed against bf16 from each round's own pair
            paired = [rate / base for rate, base in zip(rates[level][fmt], rates[level]["bf16"])]
            r = results[level][fmt]
            r |= {"decode_tokens_per_s": max(rates[level][fmt]), "decode_tokens_per_s_rounds": rates[level][fmt],
                  "decode_x_bf16_rounds": paired, "decode_x_bf16": statistics.median(paired),
                  "floor_tokens_per_s": floor_bandwidth / r["read_bytes_per_token"]}
            r["decode_share_of_floor"] = r["decode_tokens_per_s"] / r["floor_tokens_per_s"]
    config = CONFIGS[a.config]
    report = {"config_name": a.config, "config": {k: config[k] for k in (
                  "hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "vocab_size")},
              "bf16_bytes_read_per_token": active_bytes_per_token(config),
              "threads": a.threads, "read_bandwidth_GB_per_s": [b / 1e9 for b in bandwidth], "levels": results,
              "torch_alternatives": torch_alternatives()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"checkpoint '{a.config}': {report['bf16_bytes_read_per_token'] / 1e6:.0f} MB read per token in bf16; "
          f"{a.threads} threads; read bandwidth {bandwidth[0] / 1e9:.1f} GB/s at the start, {bandwidth[1] / 1e9:.1f} at "
          "the end (the floor: the better one over each format's bytes read per token); decode tok/s: the best "
          "round; its x bf16: the median over rounds of each round's ratio (formats run back to back in a round, "
          "so a round's pair sees one machine state); top-1 / KL against the bf16 model's logits (bf16's row: "
          "against float32, the noise floor)")
    for level in levels:
        base = results[level]["bf16"]
        print(f"\n{level} (kernels: {base['kernels']})")
        print(f"{'format':6} {'weights MB':>10} {'x bf16':>7} {'planner':>8} {'RSS/ckpt':>8} {'anon MB':>7} "
              f"{'matmul GB/s':>11} {'G w/s':>6} {'x bf16':>7} {'decode tok/s':>12} {'floor':>6} {'x bf16':>7} "
              f"{'rounds':>17} {'top-1':>6} {'KL':>8}")
        for fmt, r in results[level].items():
            m = r["matmul_4096"]
            print(f"{fmt:6} {r['weight_bytes'] / 1e6:10.1f} {r['weight_bytes'] / base['weight_bytes']:7.3f} "
                  f"{r['weight_bytes'] / r['planner_bytes']:8.3f} "
                  f"{r['rss_growth_bytes']['model'] / r['checkpoint_bytes']:8.3f} {r['rss_growth_bytes']['RssAnon'] / 1e6:7.1f} "
                  f"{m['GB_per_s']:11.1f} {m['G_weights_per_s']:6.1f} "
                  f"{m['G_weights_per_s'] / base['matmul_4096']['G_weights_per_s']:7.2f} "
                  f"{r['decode_tokens_per_s']:12.1f} {r['decode_share_of_floor']:6.0%} {r['decode_x_bf16']:7.2f} "
                  f"{' '.join(f'{x:.2f}' for x in r['decode_x_bf16_rounds']):>17} {r['top1_vs_bf16']:6.3f} {r['kl_vs_bf16']:8.5f}")
    for name, r in report["torch_alternatives"].items():
        print(f"torch: {name}: " + (f"{r['G_weights_per_s']:.1f} G weights/s" if "error" not in r else r["error"]))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
