"""`moemesh quantize`: a Hugging Face DeepSeek-V3 checkpoint (bf16/fp32, or the official FP8) -> a sharded
checkpoint in the MLX affine format (int4 or int8 groups), which the torch and MLX backends and mlx-lm load.

Tensors stream one at a time from the memory-mapped source into shards of bounded size, so a 700 GB model
converts in a few GB of memory. Names stay the Hugging Face ones (routed experts one by one), except that a
quantized MLA kv_b_proj is written as mlx-lm writes it: split per head into `embed_q` (the key half,
transposed) and `unembed_out` (the value half), the two products absorbed attention runs, each packed so
that decode reads it packed. config.json records the format under `quantization` (and its copy
`quantization_config`) as mlx-lm does, with an entry for every module whose precision differs from the default.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .kernels.fp8 import Fp8Weight, dequantize
from .kernels.formats import quantize
from .model.checkpoint import FP8_DTYPE, Checkpoint
from .spec.config import BITS, GROUP_SIZES, ModelArgs
from .spec.layout import mlx_module, split_kv_b_shapes

PARTS = ("attn", "shared", "experts", "dense", "embed", "head")  # what --keep can name
KEEP_FULL = 16  # --keep-bits 16: kept parts stay in the source's float format
Progress = Callable[[str, int, int], None]  # (tensor name, tensors done, tensors in all)


@dataclass(frozen=True)
class Recipe:
    bits: int = 4
    group_size: int = 64
    keep: frozenset[str] = frozenset()  # parts quantized at keep_bits instead
    keep_bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in BITS or self.keep_bits not in BITS + (KEEP_FULL,):
            raise ValueError(f"bits must be one of {BITS} (keep bits: or {KEEP_FULL} to leave them unquantized)")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}")
        unknown = set(self.keep) - set(PARTS)
        if unknown:
            raise ValueError(f"--keep: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")

    def bits_for(self, part: str) -> int:
        return self.keep_bits if part in self.keep else self.bits


def part_of(name: str) -> str | None:
    """Which part a tensor belongs to, or None for tensors never quantized: norms, biases and the router."""
    if not name.endswith(".weight") or "norm" in name:
        return None
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "lm_head.weight" or name.endswith("shared_head.head.weight"):
        return "head"
    if ".self_attn." in name:
        return "attn"
    if ".mlp.shared_experts." in name:
        return "shared"
    if ".mlp.experts." in name:
        return "experts"
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "eh_proj.weight")):
        return "dense"
    return None


def _source(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A source tensor in a float format: FP8 weights are dequantized to bf16 (as DeepSeek's own cast and
    mlx-lm's conversion do)."""
    t = ckpt.read(name)
    if t.dtype != FP8_DTYPE:
        return t
    weight, scale = ckpt.read_linear(name, tuple(t.shape))
    return dequantize(Fp8Weight(weight, scale, ckpt.args.fp8_block), torch.bfloat16)


def mlx_kv_b_halves(args: ModelArgs, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """kv_b_proj [heads*(nope+v), kv_lora] -> mlx-lm's `embed_q` [heads, kv_lora, nope] (the key half,
    transposed: groups then run along nope, the input of the product it serves) and `unembed_out`
    [heads, v, kv_lora]."""
    prefix = name.removesuffix("kv_b_proj.weight")
    w = w.view(args.num_attention_heads, args.qk_nope_head_dim + args.v_head_dim, args.kv_lora_rank)
    halves = (w[:, : args.qk_nope_head_dim].transpose(1, 2), w[:, args.qk_nope_head_dim :])
    return {prefix + k: t.contiguous() for k, t in zip(split_kv_b_shapes(args), halves)}


class ShardWriter:
    """Safetensors shards of at most `max_bytes` each (one tensor may exceed it), and their index."""

    def __init__(self, dst: Path, max_bytes: int):
        self.dst, self.max_bytes = dst, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []  # tensor names per written shard
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.pending and sum(v.nbytes for v in self.pending.values()) + t.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.total += t.nbytes

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, str(self.dst / f"shard-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
            self.files.append(list(self.pending))
            self.pending = {}

    def finish(self) -> None:
        """Name the shards model-0000i-of-0000n (known only now) and write the index."""
        self.flush()
        weight_map = {}
        for i, names in enumerate(self.files):
            file = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.dst / f"shard-{i:05d}.safetensors").rename(self.dst / file)
            weight_map |= dict.fromkeys(names, file)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert(src: str | Path, dst: str | Path, recipe: Recipe, max_shard_bytes: int = 2 << 30,
            progress: Progress | None = None) -> dict:
    """Quantize checkpoint `src` into the new directory `dst`; returns the config.json written."""
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    if ckpt.args.affine is not None:
        raise ValueError(f"{src} is already quantized in the MLX affine format")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted((n for n in ckpt.weight_map if not n.endswith("weight_scale_inv")),
                   key=lambda n: (ckpt.weight_map[n], n))  # file by file: the page cache streams
    quant: dict = {"group_size": recipe.group_size, "bits": recipe.bits, "mode": "affine"}
    out = ShardWriter(dst, max_shard_bytes)
    for i, name in enumerate(names):
        t = _source(ckpt, name)
        part = part_of(name)
        bits = recipe.bits_for(part) if part else None
        pieces = {name: t}
        if bits not in (None, KEEP_FULL) and name.endswith("kv_b_proj.weight"):
            pieces = mlx_kv_b_halves(ckpt.args, name, t)
        for piece, w in pieces.items():
            module = mlx_module(piece.removesuffix(".weight"))
            if bits is None or bits == KEEP_FULL or w.dim() < 2 or w.shape[-1] % recipe.group_size:
                out.add(piece, w)
                if part:  # a linear module left unquantized: mlx-lm's loader must not expect scales
                    quant[module] = False
            else:
                words, scales = quantize(w, bits, recipe.group_size)
                stem = piece.removesuffix("weight")
                out.add(stem + "weight", words)
                out.add(stem + "scales", scales.scales)
                out.add(stem + "biases", scales.biases)
                if bits != recipe.bits:
                    quant[module] = {"group_size": recipe.group_size, "bits": bits, "mode": "affine"}
        if progress:
            progress(name, i + 1, len(names))
    out.finish()
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config |= {"quantization": quant, "quantization_config": quant}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():  # tokenizer, chat template, generation config
        if extra.is_file() and extra.name not in ("config.json", "model.safetensors.index.json") \
                and extra.suffix != ".safetensors":
            shutil.copy2(extra, dst / extra.name)
    return config

