"""Bytes and flops of every part of a DeepSeek-V3 model, from config.json alone.

The one place where weight formats are turned into bytes (docs/placement.md, "Byte accounting"):

| tensor                                  | bf16 | fp8 (official)                    | int4 / int8 (MLX affine)          |
|-----------------------------------------|------|-----------------------------------|-----------------------------------|
| 2-D linear weight [out, in]             | 2    | 1 + f32 scale per 128x128 block   | bits/8 + (bf16 scale + bias)/group|
| embed_tokens, lm_head                   | 2    | 2 (kept bf16)                     | quantized (default, like mlx-lm) or 2 |
| router `mlp.gate.weight`                | 4    | 4 (held f32)                      | 4 (held f32)                      |
| MLA `kv_b_proj` (absorbed, per head)    | 2    | fp8 where blocks fit heads, else 2| quantized, split per head (below) |
| 1-D (norms, biases)                     | 2    | 2                                 | 2                                 |
| `e_score_correction_bias`               | 4    | 4                                 | 4                                 |

bytes per param for an int format = bits/8 + 4/group_size (0.5625 for int4 with groups of 64).
Groups run along the input dimension, as in `mx.quantize`: out * in / group groups; a weight whose input
is not whole groups stays in the compute dtype (2), as mlx-lm and `moemesh quantize` leave it. A quantized
`kv_b_proj` is stored split per head as mlx-lm stores it: `embed_q` [heads, kv_lora, nope] (inputs: nope)
and `unembed_out` [heads, v, kv_lora].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from operator import mul

from .config import AffineQuant, ModelArgs
from .formats import FP8_BLOCK
from .layout import (Shape, attention_shapes, head_shapes, layer_prefix, mlp_shapes, mlx_module, mtp_head_shapes,
                     router_shapes, split_kv_b_shapes)

QUANTS = ("bf16", "fp8", "int4", "int8", "fp32")  # fp32: bf16 checkpoints run in float32
ACTIVATION_BYTES = 2  # hidden states travel between nodes in bf16


@dataclass(frozen=True)
class WeightFormat:
    name: str  # one of QUANTS
    group_size: int = 64  # int4/int8: elements sharing one scale and bias
    quantize_embeddings: bool = True  # int4/int8: mlx-lm quantizes nn.Embedding and lm_head too
    fp8_block: tuple[int, int] = FP8_BLOCK
    # An affine checkpoint's own record (config.json `quantization`): bits and group size per module, or None
    # for modules it leaves unquantized. Without it, every linear weight takes name/group_size.
    affine: AffineQuant | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.name not in QUANTS:
            raise ValueError(f"quant '{self.name}' is not one of {', '.join(QUANTS)}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def bits(self) -> int:
        return {"bf16": 16, "fp8": 8, "int4": 4, "int8": 8, "fp32": 32}[self.name]

    def linear_bytes(self, shape: Shape, module: str = "") -> int:
        """A linear weight [out, in]; `module` (its Hugging Face path) picks the affine record's entry."""
        out, inp = shape
        if self.name in ("bf16", "fp32"):
            return self.bits // 8 * out * inp
        if self.name == "fp8":
            bo, bi = self.fp8_block
            return out * inp + 4 * math.ceil(out / bo) * math.ceil(inp / bi)
        bits, group = self.bits, self.group_size
        if self.affine is not None:
            entry = self.affine.for_module(mlx_module(module))
            if entry is None:
                return 2 * out * inp
            bits, group = entry
        if inp % group:
            return 2 * out * inp
        return out * inp * bits // 8 + out * inp // group * 2 * 2  # bf16 scale + bias per group

    def embedding_bytes(self, shape: Shape, module: str = "") -> int:
        if self.name in ("int4", "int8") and (self.quantize_embeddings or self.affine is not None):
            return self.linear_bytes(shape, module)
        return (4 if self.name == "fp32" else 2) * shape[0] * shape[1]

    def router_bytes(self, shape: Shape) -> int:
        return 4 * shape[0] * shape[1]  # the runtime holds the router in float32 whatever the checkpoint has


def checkpoint_format(args: ModelArgs, dtype: str = "bfloat16") -> WeightFormat:
    """How a checkpoint's weights sit in memory when loaded in `dtype`: its affine bits per module, its FP8
    blocks, or the compute dtype."""
    if args.affine is not None:
        return WeightFormat(f"int{args.affine.bits}", group_size=args.affine.group_size, affine=args.affine)
    if args.fp8_block is not None:
        return WeightFormat("fp8", fp8_block=args.fp8_block)
    return WeightFormat("fp32" if dtype == "float32" else "bf16")


def weight_format(quant: str, args: ModelArgs | None = None, **kwargs) -> WeightFormat:
    """The format named `quant`; fp8 takes its block shape from the config when it has one."""
    if quant == "fp8" and args is not None and args.fp8_block is not None:
        kwargs.setdefault("fp8_block", args.fp8_block)
    return WeightFormat(quant, **kwargs)


def _numel(shape: Shape) -> int:
    return reduce(mul, shape, 1)


def tensor_bytes(name: str, shape: Shape, fmt: WeightFormat) -> int:
    if name.endswith("e_score_correction_bias"):
        return 4 * _numel(shape)
    if len(shape) == 1:
        return (4 if fmt.name == "fp32" else 2) * shape[0]
    module = name.removesuffix(".weight")
    if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
        return fmt.embedding_bytes(shape, module)
    if name.endswith("mlp.gate.weight") or name == "gate.weight":
        return fmt.router_bytes(shape)
    if name.endswith("kv_b_proj.weight"):  # split per head for absorbed MLA, in the compute dtype
        return (4 if fmt.name == "fp32" else 2) * _numel(shape)
    return fmt.linear_bytes(shape, module)


def _bytes(shapes: dict[str, Shape], fmt: WeightFormat, prefix: str = "") -> int:
    return sum(tensor_bytes(prefix + n, s, fmt) for n, s in shapes.items())


def _matmul_params(shapes: dict[str, Shape]) -> int:
    """Params that take part in a matmul per token (2 flops each)."""
    return sum(_numel(s) for s in shapes.values() if len(s) == 2)


@dataclass(frozen=True)
class LayerSize:
    layer: int
    moe: bool
    dense_bytes: int  # attention, norms, dense MLP or router + shared experts: held and read per token
    dense_params: int  # matmul params of that part
    expert_bytes: int  # one routed expert (0 in dense layers)
    expert_params: int
    n_experts: int

    @property
    def held_bytes(self) -> int:
        return self.dense_bytes + self.n_experts * self.expert_bytes


@dataclass(frozen=True)
class ModelSizes:
    fmt: WeightFormat
    layers: tuple[LayerSize, ...]  # the main transformer blocks, in order
    head_bytes: int  # on the head node: embeddings + final norm + lm_head
    head_read_bytes: int  # read per token: lm_head + final norm + one embedding row
    head_params: int  # lm_head matmul params
    mtp_bytes: int  # MTP modules held on the head (0 when absent or left out)
    mtp_layers: int
    kv_bytes_per_token: int  # per layer, for the KV cache element size asked for
    hidden_bytes: int  # one token's hidden state on the wire
    top_k: int
    n_experts: int

    @property
    def weight_bytes(self) -> int:
        return self.head_bytes + self.mtp_bytes + sum(s.held_bytes for s in self.layers)

    @property
    def read_bytes_per_token(self) -> int:
        """Weights read to decode one token (MoE layers read top_k routed experts)."""
        return self.head_read_bytes + sum(s.dense_bytes + self.top_k * s.expert_bytes for s in self.layers)


def _kv_b_held_packed(a: ModelArgs, fmt: WeightFormat) -> bool:
    """Whether kv_b_proj's per-head halves stay in the checkpoint's format: int4/int8 checkpoints store them
    split; FP8 halves stay FP8 where nope, v and kv_lora fill whole blocks (the key half's transpose keeps
    each block's scale)."""
    if fmt.name in ("int4", "int8"):
        return True
    bo, bi = fmt.fp8_block
    return fmt.name == "fp8" and bo == bi and not (a.qk_nope_head_dim % bo or a.v_head_dim % bo or a.kv_lora_rank % bo)


def _layer_parts(a: ModelArgs, layer: int, fmt: WeightFormat) -> LayerSize:
    p = layer_prefix(layer)
    dense = {"input_layernorm.weight": (a.hidden_size,), "post_attention_layernorm.weight": (a.hidden_size,)}
    attention = attention_shapes(a)
    if _kv_b_held_packed(a, fmt):  # split per head, each half's heads stacked
        del attention["kv_b_proj.weight"]
        attention |= {k: (s[0] * s[1], s[2]) for k, s in split_kv_b_shapes(a).items()}
    dense |= {"self_attn." + k: v for k, v in attention.items()}
    moe = a.is_moe_layer(layer)
    if not moe:
        dense |= {"mlp." + k: v for k, v in mlp_shapes(a.hidden_size, a.intermediate_size).items()}
        return LayerSize(layer, False, _bytes(dense, fmt, p), _matmul_params(dense), 0, 0, 0)
    dense |= {"mlp.gate." + k: v for k, v in router_shapes(a).items()}
    if a.n_shared_experts:
        shared = mlp_shapes(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
        dense |= {"mlp.shared_experts." + k: v for k, v in shared.items()}
    expert = {"mlp.experts.0." + k: v for k, v in mlp_shapes(a.hidden_size, a.moe_intermediate_size).items()}
    return LayerSize(layer, True, _bytes(dense, fmt, p), _matmul_params(dense),
                     _bytes(expert, fmt, p), _matmul_params(expert), a.n_routed_experts)


def model_sizes(a: ModelArgs, fmt: WeightFormat, mtp: bool = True, kv_element_bytes: int = 2) -> ModelSizes:
    layers = tuple(_layer_parts(a, i, fmt) for i in range(a.num_hidden_layers))
    head = head_shapes(a)
    head_bytes = _bytes(head, fmt)
    embed = head["model.embed_tokens.weight"]
    # Tied embeddings: lm_head is the embedding matrix, read whole per token.
    lm_head = head.get("lm_head.weight", embed)
    lm_head_name = "lm_head" if "lm_head.weight" in head else "model.embed_tokens"
    head_read = (fmt.embedding_bytes(lm_head, lm_head_name) + 2 * a.hidden_size
                 + fmt.embedding_bytes(embed, "model.embed_tokens") // a.vocab_size)
    mtp_bytes = 0
    mtp_layers = a.mtp_layers if mtp else range(0)
    for layer in mtp_layers:
        mtp_bytes += _bytes(mtp_head_shapes(a), fmt, layer_prefix(layer)) + _layer_parts(a, layer, fmt).held_bytes
    return ModelSizes(
        fmt=fmt,
        layers=layers,
        head_bytes=head_bytes,
        head_read_bytes=head_read,
        head_params=_numel(lm_head),
        mtp_bytes=mtp_bytes,
        mtp_layers=len(mtp_layers),
        kv_bytes_per_token=a.kv_cache_bytes_per_token(kv_element_bytes),
        hidden_bytes=a.hidden_size * ACTIVATION_BYTES,
        top_k=a.num_experts_per_tok,
        n_experts=a.n_routed_experts,
    )
