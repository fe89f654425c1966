"""Tensor names and shapes of a DeepSeek-V3 checkpoint in the Hugging Face layout, from the config alone.

Pure Python: the checkpoint reader validates against these shapes, and the placement planner
counts bytes with them. Linear weights are [out_features, in_features].
"""

from __future__ import annotations

import re

from .config import ModelArgs

Shape = tuple[int, ...]
# A routed expert's tensor by its Hugging Face name (mlx-lm stacks each layer's experts as `switch_mlp`).
EXPERT_TENSOR = re.compile(r"(?P<pre>.+\.mlp\.)experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
                           r"(?P<part>weight|scales|biases)$")


def attention_shapes(a: ModelArgs) -> dict[str, Shape]:
    """`self_attn.*` tensors of one layer (biases only when `attention_bias`)."""
    h, d = a.num_attention_heads, a.hidden_size
    shapes: dict[str, Shape] = {}
    if a.q_lora_rank is None:
        shapes["q_proj.weight"] = (h * a.qk_head_dim, d)
    else:
        shapes["q_a_proj.weight"] = (a.q_lora_rank, d)
        shapes["q_a_layernorm.weight"] = (a.q_lora_rank,)
        shapes["q_b_proj.weight"] = (h * a.qk_head_dim, a.q_lora_rank)
        if a.attention_bias:
            shapes["q_a_proj.bias"] = (a.q_lora_rank,)
    shapes["kv_a_proj_with_mqa.weight"] = (a.kv_cache_width, d)
    shapes["kv_a_layernorm.weight"] = (a.kv_lora_rank,)
    shapes["kv_b_proj.weight"] = (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
    shapes["o_proj.weight"] = (d, h * a.v_head_dim)
    if a.attention_bias:
        shapes["kv_a_proj_with_mqa.bias"] = (a.kv_cache_width,)
        shapes["o_proj.bias"] = (d,)
    return shapes


def split_kv_b_shapes(a: ModelArgs) -> dict[str, Shape]:
    """kv_b_proj as mlx-lm stores it (and `moemesh quantize` writes it quantized): per head, the key half
    transposed and the value half, the two products of absorbed MLA."""
    h = a.num_attention_heads
    return {"embed_q.weight": (h, a.kv_lora_rank, a.qk_nope_head_dim), "unembed_out.weight": (h, a.v_head_dim, a.kv_lora_rank)}


def mlp_shapes(hidden: int, intermediate: int) -> dict[str, Shape]:
    """A SwiGLU MLP: the dense FFN, one routed expert, or the shared experts (fused)."""
    return {
        "gate_proj.weight": (intermediate, hidden),
        "up_proj.weight": (intermediate, hidden),
        "down_proj.weight": (hidden, intermediate),
    }


def router_shapes(a: ModelArgs) -> dict[str, Shape]:
    return {"weight": (a.n_routed_experts, a.hidden_size), "e_score_correction_bias": (a.n_routed_experts,)}


def mtp_head_shapes(a: ModelArgs) -> dict[str, Shape]:
    """Tensors of an MTP layer outside its transformer block (`model.layers.{N}.*`)."""
    d = a.hidden_size
    return {
        "enorm.weight": (d,),
        "hnorm.weight": (d,),
        "eh_proj.weight": (d, 2 * d),
        "shared_head.norm.weight": (d,),
        # shared_head.head is optional: the main lm_head serves when it is absent.
    }


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def block_shapes(a: ModelArgs, layer: int, experts: range | list[int] | None = None) -> dict[str, Shape]:
    """All tensors of one transformer block, full names; `experts` limits the routed experts listed."""
    p = layer_prefix(layer)
    shapes = {p + "input_layernorm.weight": (a.hidden_size,), p + "post_attention_layernorm.weight": (a.hidden_size,)}
    shapes |= {p + "self_attn." + k: v for k, v in attention_shapes(a).items()}
    if not a.is_moe_layer(layer):
        shapes |= {p + "mlp." + k: v for k, v in mlp_shapes(a.hidden_size, a.intermediate_size).items()}
        return shapes
    shapes |= {p + "mlp.gate." + k: v for k, v in router_shapes(a).items()}
    if a.n_shared_experts:
        shared = mlp_shapes(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
        shapes |= {p + "mlp.shared_experts." + k: v for k, v in shared.items()}
    expert = mlp_shapes(a.hidden_size, a.moe_intermediate_size)
    for e in range(a.n_routed_experts) if experts is None else experts:
        shapes |= {p + f"mlp.experts.{e}." + k: v for k, v in expert.items()}
    return shapes


def head_shapes(a: ModelArgs) -> dict[str, Shape]:
    """Embedding, final norm and lm_head (absent when tied to the embedding)."""
    shapes = {"model.embed_tokens.weight": (a.vocab_size, a.hidden_size), "model.norm.weight": (a.hidden_size,)}
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, a.hidden_size)
    return shapes


def mlx_module(path: str) -> str:
    """The module path mlx-lm uses for a Hugging Face module path (routed experts are stacked per layer): the
    key of config.json's per-module `quantization` entries."""
    m = EXPERT_TENSOR.match(path + ".weight")
    return f"{m['pre']}switch_mlp.{m['proj']}" if m else path
