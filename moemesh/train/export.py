"""Writing a trained model as a Hugging Face DeepSeek-V3 checkpoint that moemesh, transformers and vLLM read:
config.json, model.safetensors (official tensor names, MTP layer included), the tokenizer, a model card and
the routing statistics recorded in training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..kernels.formats import fp8_quantize
from ..spec.routing import RoutingStats
from .model import DeepseekV3

FP8_BLOCK = (128, 128)
WEIGHT_FORMATS = ("bf16", "fp8")


@dataclass
class Report:
    """What the model card states about a training run."""
    corpus: str
    train_files: int
    held_out_files: int
    train_tokens: int
    steps: int
    tokens_seen: int
    wall_s: float
    held_out_loss: float
    held_out_accuracy: float
    mtp_accuracy: float
    command: str


def _quantized_in_fp8(name: str, t: torch.Tensor) -> bool:
    """As in the released checkpoint: linear weights inside the layers, but not the router."""
    return t.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight")


def checkpoint_tensors(model: DeepseekV3, weight_format: str = "bf16") -> dict[str, torch.Tensor]:
    """The state dict under its checkpoint names: router weight and correction bias in float32 (as released),
    the rest bf16, or with `fp8` the layers' linear weights as e4m3 with 128x128 block scales."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format '{weight_format}': choose {' or '.join(WEIGHT_FORMATS)}")
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            out[name] = t.contiguous()
        elif weight_format == "fp8" and _quantized_in_fp8(name, t):
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = fp8_quantize(t, FP8_BLOCK)
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def config_dict(config: dict, weight_format: str) -> dict:
    if weight_format == "fp8":
        return config | {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": list(FP8_BLOCK)}}
    return config


def write_checkpoint(model: DeepseekV3, config: dict, path: Path, weight_format: str = "bf16") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(model, weight_format), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_dict(config, weight_format), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}) + "\n")
    return path


def write_routing(stats: RoutingStats, path: Path) -> None:
    stats.save(path / "routing.json")


def write_card(path: Path, config: dict, report: Report, weight_format: str, params: int) -> None:
    """README.md: what the model is, what it was trained on, and how well it does on held-out files."""
    c, r = config, report
    fmt = "FP8 e4m3 in 128x128 blocks (the official format)" if weight_format == "fp8" else "bf16"
    text = f"""# moemesh built-in model

A small DeepSeek-V3-architecture model trained by `moemesh train-demo` on two CPU cores, shipped with moemesh
as its default model. It completes Python source: it has read the Python standard library and nothing else.

| | |
|---|---|
| parameters | {params / 1e6:.1f} M ({c["num_hidden_layers"]} layers + 1 MTP layer, hidden {c["hidden_size"]}, vocabulary {c["vocab_size"]}) |
| attention | MLA: {c["num_attention_heads"]} heads, q-lora {c["q_lora_rank"]}, kv-lora {c["kv_lora_rank"]}, YaRN rope x{c["rope_scaling"]["factor"]} |
| experts | layer 0 dense; then {c["n_routed_experts"]} routed ({c["n_group"]} groups, top-{c["topk_group"]} groups, {c["num_experts_per_tok"]} per token, sigmoid) + {c["n_shared_experts"]} shared |
| weights | {fmt}; router and correction bias float32 |
| corpus | {r.corpus}: {r.train_files} files for training ({r.train_tokens:,} tokens), {r.held_out_files} held out (split by file, fixed seed) |
| training | {r.steps} steps, {r.tokens_seen:,} tokens, {r.wall_s / 60:.1f} min wall time; next-token loss + 0.3 x MTP loss; auxiliary-loss-free balancing of the routing bias |
| held-out loss | {r.held_out_loss:.3f} nats/token |
| held-out next-token accuracy | {100 * r.held_out_accuracy:.1f}% |
| held-out MTP accuracy (token after next) | {100 * r.mtp_accuracy:.1f}% |

`routing.json` holds the trained router's expert loads over the held-out text (format `moemesh.routing/1`), for the
placement planner. Rebuild with:

    {r.command}
"""
    (path / "README.md").write_text(text)
