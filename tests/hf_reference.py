"""Tiny DeepSeek-V3 checkpoints built with transformers (the referee), plus the official-format FP8
conversion and hand-made MTP layers that transformers does not write."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moemesh.kernels.formats import fp8_dequantize, fp8_quantize

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=20, n_group=2, topk_group=1,
    num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=512, num_mtp_layers=0,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)

# Checkpoint shapes the referee runs: each differs from BASE where named.
SHAPES = {
    "base": {},
    "no_q_lora_plain_rope_2dense": dict(q_lora_rank=None, first_k_dense_replace=2, n_group=1, topk_group=1,
                                        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "odd_dims_4groups": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=3, qk_nope_head_dim=17,
                             v_head_dim=19, qk_rope_head_dim=10, kv_lora_rank=24, q_lora_rank=40, n_routed_experts=16,
                             n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                             routed_scaling_factor=1.0, moe_intermediate_size=20,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                              "original_max_position_embeddings": 32, "beta_fast": 16,
                                              "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 1.0}),
    "halfsplit_rope_bias_tied": dict(rope_interleave=False, attention_bias=True, tie_word_embeddings=True,
                                     n_shared_experts=2, n_group=4, topk_group=4, num_experts_per_tok=4),
}


def make_config(**overrides) -> DeepseekV3Config:
    return DeepseekV3Config(**(BASE | overrides))


def build_checkpoint(path: Path, config: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    """A random float32 model saved with save_pretrained. Norm weights, biases and the routing correction
    bias are randomized too, so a mistake in any of them shows in the logits."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.05)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def add_mtp_layer(path: Path, config: DeepseekV3Config, seed: int = 1) -> None:
    """Give a saved checkpoint an MTP layer at index num_hidden_layers (random block weights, named as in
    the released checkpoint), and set num_nextn_predict_layers = 1."""
    g = torch.Generator().manual_seed(seed)
    donor = path / "model.safetensors"
    tensors = load_file(donor)
    last, n = config.num_hidden_layers - 1, config.num_hidden_layers
    for name, t in list(tensors.items()):
        prefix = f"model.layers.{last}."
        if name.startswith(prefix):
            tensors[f"model.layers.{n}." + name[len(prefix):]] = (t + 0.02 * torch.randn(t.shape, generator=g)).to(t.dtype)
    d = config.hidden_size
    tensors[f"model.layers.{n}.enorm.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
    tensors[f"model.layers.{n}.hnorm.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
    tensors[f"model.layers.{n}.eh_proj.weight"] = 0.05 * torch.randn(d, 2 * d, generator=g)
    tensors[f"model.layers.{n}.shared_head.norm.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
    tensors[f"model.layers.{n}.shared_head.head.weight"] = 0.05 * torch.randn(config.vocab_size, d, generator=g)
    save_file(tensors, donor, metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))


def make_mtp_predictive(path: Path, config: DeepseekV3Config, damping: float = 0.5) -> None:
    """Make a checkpoint's MTP layer (from `add_mtp_layer`) a good draft model, by hand: the main model's layers
    write `damping` times their output into the residual stream (o_proj and down_proj scaled), so the embedding
    mostly decides the next token; the MTP layer passes the embedding of its input token through unchanged
    (eh_proj = [I | 0], its block's o_proj and down_proj zero, unit enorm) into the main model's final norm and
    lm_head. Its draft is then the token the main model would predict from that token alone, which the main
    model's own prediction often, not always, is (damping 0: always)."""
    tensors = load_file(path / "model.safetensors")
    n, d = config.num_hidden_layers, config.hidden_size
    for name, t in list(tensors.items()):
        if name.endswith(("o_proj.weight", "down_proj.weight")) and name.startswith("model.layers."):
            own = name.startswith(f"model.layers.{n}.")
            tensors[name] = torch.zeros_like(t) if own else damping * t
    p = f"model.layers.{n}."
    tensors[p + "eh_proj.weight"] = torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1)
    tensors[p + "enorm.weight"] = torch.ones(d)
    tensors[p + "shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def is_quantized_in_official_format(name: str, t: torch.Tensor) -> bool:
    """Linear weights inside the layers; not the router, norms, embedding or lm_head."""
    return (t.dim() == 2 and name.endswith(".weight") and ".layers." in name and "mlp.gate.weight" not in name
            and "embed_tokens" not in name and "shared_head.head" not in name)


def convert_to_fp8(src: Path, dst: Path, block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """Write `src` in the official FP8 layout to `dst`; returns the dequantized state dict (the reference)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    out, reference = {}, {}
    for name, t in tensors.items():
        if is_quantized_in_official_format(name, t):
            q, s = fp8_quantize(t, block)
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            reference[name] = fp8_dequantize(q, s, block)
        else:
            out[name] = reference[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return reference
