"""Model arguments for the DeepSeek-V3 architecture, read from a Hugging Face `config.json`.

Pure Python (no torch): the placement planner sizes models from this module alone.
Both spellings found in the wild are accepted:
- the published DeepSeek-V3 repositories: `rope_scaling` with `type`, `rope_theta` at top level,
  no `rope_interleave` (their rope rotates interleaved pairs);
- transformers 5: `rope_parameters` with `rope_type` (and `rope_theta` inside), `rope_interleave`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .formats import BITS, GROUP_SIZES


class ConfigError(ValueError):
    """A config.json this engine cannot run; the message names the field."""


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # cos/sin multiplier; derived from mscales when absent
    truncate: bool = True


@dataclass(frozen=True)
class AffineQuant:
    """MLX affine quantization, as mlx-lm (and `moemesh quantize`) record it in config.json's `quantization`:
    default bits and group size, plus per-module entries keyed by module path (e.g.
    `model.layers.0.self_attn.o_proj`): (bits, group_size), or None for a module left unquantized."""
    bits: int
    group_size: int
    overrides: dict[str, tuple[int, int] | None] = field(default_factory=dict, hash=False)

    def for_module(self, path: str) -> tuple[int, int] | None:
        return self.overrides.get(path, (self.bits, self.group_size))


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # Official FP8 format: e4m3 weights with one float32 scale per block of this shape.
    fp8_block: tuple[int, int] | None = None
    # MLX affine format (int4/int8 groups): packed uint32 weights plus scales and biases.
    affine: AffineQuant | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Elements cached per token per layer: normalized latent + rope key (MLA)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_cache_bytes_per_token(self, element_size: int) -> int:
        """Bytes of KV cache per token per layer."""
        return self.kv_cache_width * element_size

    def is_moe_layer(self, layer: int) -> bool:
        # The MTP block (layer index num_hidden_layers) follows the same rule.
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def mtp_layers(self) -> range:
        return range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_SUPPORTED_TYPES = ("deepseek_v3", "kimi_k2")


def _int(cfg: dict, key: str, default: int | None = None) -> int:
    """An integer field (an integral float like 7168.0 too); absent or null: `default`, or an error if required."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise ConfigError(f"config.json: required field '{key}' is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"config.json: '{key}' must be an integer, got {value!r}")
    return int(value)


def _float(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config.json: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _bool(cfg: dict, key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: '{key}' must be true or false, got {value!r}")
    return value


def _rope(cfg: dict) -> tuple[float, YarnScaling | None]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: 'rope_parameters'/'rope_scaling' must be an object, got {params!r}")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"config.json: rope type '{kind}' is not supported (DeepSeek-V3 uses 'yarn' or none)")
    max_pos = _int(cfg, "max_position_embeddings", 4096)
    original = int(params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    return theta, YarnScaling(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _mlx_quantization(cfg: dict) -> dict | None:
    """mlx-lm writes `quantization` and a copy of it as `quantization_config` (no quant_method there)."""
    if "quantization" in cfg:
        return cfg["quantization"]
    quant = cfg.get("quantization_config")
    return quant if isinstance(quant, dict) and "quant_method" not in quant and "bits" in quant else None


def _affine_params(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {where} must be an object with 'bits' and 'group_size', got {value!r}")
    mode = value.get("mode", "affine")
    if mode != "affine":
        raise ConfigError(f"config.json: {where}.mode '{mode}' is not supported (only 'affine')")
    bits, group = value.get("bits"), value.get("group_size")
    if bits not in BITS:
        raise ConfigError(f"config.json: {where}.bits {bits!r} is not supported (only {' or '.join(map(str, BITS))})")
    if group not in GROUP_SIZES:
        raise ConfigError(f"config.json: {where}.group_size {group!r} is not supported "
                          f"(only {', '.join(map(str, GROUP_SIZES))})")
    return bits, group


def _affine(cfg: dict) -> AffineQuant | None:
    quant = _mlx_quantization(cfg)
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json: 'quantization' must be an object, got {quant!r}")
    bits, group = _affine_params(quant, "quantization")
    overrides: dict[str, tuple[int, int] | None] = {}
    for path, value in quant.items():
        if path in ("bits", "group_size", "mode"):
            continue
        if isinstance(value, bool):
            overrides[path] = (bits, group) if value else None
        else:
            overrides[path] = _affine_params(value, f"quantization['{path}']")
    return AffineQuant(bits, group, overrides)


def _fp8_block(cfg: dict) -> tuple[int, int] | None:
    quant = cfg.get("quantization_config")
    if not quant or _mlx_quantization(cfg) is not None:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config.quant_method '{method}' is not supported "
                          "(only 'fp8', or MLX affine quantization as mlx-lm records it under 'quantization')")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"config.json: quantization_config.fmt '{quant.get('fmt')}' is not supported (only 'e4m3')")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return (block[0], block[1])


def _eos_ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"config.json: 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return tuple(values)


def args_from_dict(cfg: dict) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in _SUPPORTED_TYPES:
        raise ConfigError(
            f"config.json: model_type '{model_type}' is not supported; moemesh runs the DeepSeek-V3 architecture "
            f"(model_type {' or '.join(repr(t) for t in _SUPPORTED_TYPES)})"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act '{cfg['hidden_act']}' is not supported (only 'silu')")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"config.json: scoring_func '{cfg['scoring_func']}' is not supported (only 'sigmoid')")
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"config.json: topk_method '{cfg['topk_method']}' is not supported (only 'noaux_tc')")
    if _int(cfg, "moe_layer_freq", 1) != 1:
        raise ConfigError("config.json: moe_layer_freq other than 1 is not supported")
    heads = _int(cfg, "num_attention_heads")  # num_key_value_heads plays no part in MLA

    theta, yarn = _rope(cfg)
    n_routed = _int(cfg, "n_routed_experts", 0)
    n_group = _int(cfg, "n_group", 1)
    topk_group = _int(cfg, "topk_group", 1)
    top_k = _int(cfg, "num_experts_per_tok", 0)
    q_lora = cfg.get("q_lora_rank")
    args = ModelArgs(
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=_int(cfg, "hidden_size"),
        intermediate_size=_int(cfg, "intermediate_size"),
        num_hidden_layers=_int(cfg, "num_hidden_layers"),
        num_attention_heads=heads,
        kv_lora_rank=_int(cfg, "kv_lora_rank"),
        q_lora_rank=None if q_lora is None else _int(cfg, "q_lora_rank"),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        v_head_dim=_int(cfg, "v_head_dim"),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", 0),
        n_routed_experts=n_routed,
        n_shared_experts=_int(cfg, "n_shared_experts", 0),
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        first_k_dense_replace=_int(cfg, "first_k_dense_replace", 0),
        norm_topk_prob=_bool(cfg, "norm_topk_prob", True),
        routed_scaling_factor=_float(cfg, "routed_scaling_factor", 1.0),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
        max_position_embeddings=_int(cfg, "max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=yarn,
        rope_interleave=_bool(cfg, "rope_interleave", True),
        attention_bias=_bool(cfg, "attention_bias", False),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False),
        num_nextn_predict_layers=_int(cfg, "num_nextn_predict_layers", 0),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        fp8_block=_fp8_block(cfg),
        affine=_affine(cfg),
        extra={k: v for k, v in cfg.items() if k not in {f.name for f in fields(ModelArgs)}},
    )
    _validate(args)
    return args


def _validate(a: ModelArgs) -> None:
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
    for name in positive:
        if getattr(a, name) <= 0:
            raise ConfigError(f"config.json: '{name}' must be positive, got {getattr(a, name)}")
    if a.qk_nope_head_dim < 0:
        raise ConfigError(f"config.json: 'qk_nope_head_dim' must be >= 0, got {a.qk_nope_head_dim}")
    if a.qk_rope_head_dim % 2:
        raise ConfigError(f"config.json: 'qk_rope_head_dim' must be even (rope rotates pairs), got {a.qk_rope_head_dim}")
    if a.q_lora_rank is not None and a.q_lora_rank <= 0:
        raise ConfigError(f"config.json: 'q_lora_rank' must be positive or null, got {a.q_lora_rank}")
    if a.first_k_dense_replace < a.num_hidden_layers and a.n_routed_experts > 0:
        if a.moe_intermediate_size <= 0:
            raise ConfigError("config.json: 'moe_intermediate_size' must be positive for MoE layers")
        if not 0 < a.num_experts_per_tok <= a.n_routed_experts:
            raise ConfigError(
                f"config.json: 'num_experts_per_tok' ({a.num_experts_per_tok}) must be in 1..n_routed_experts "
                f"({a.n_routed_experts})")
        if a.n_group <= 0 or a.n_routed_experts % a.n_group:
            raise ConfigError(
                f"config.json: 'n_routed_experts' ({a.n_routed_experts}) must divide into 'n_group' ({a.n_group}) groups")
        per_group = a.n_routed_experts // a.n_group
        if a.n_group > 1 and per_group < 2:
            raise ConfigError("config.json: grouped routing needs at least 2 experts per group (top-2 sum per group)")
        if not 0 < a.topk_group <= a.n_group:
            raise ConfigError(f"config.json: 'topk_group' ({a.topk_group}) must be in 1..n_group ({a.n_group})")
        if a.num_experts_per_tok > a.topk_group * per_group:
            raise ConfigError(
                f"config.json: 'num_experts_per_tok' ({a.num_experts_per_tok}) exceeds the experts in "
                f"topk_group={a.topk_group} groups ({a.topk_group * per_group})")
    if a.rope_scaling is not None and a.rope_scaling.factor <= 0:
        raise ConfigError(f"config.json: rope factor must be positive, got {a.rope_scaling.factor}")


def load_config(path: str | Path) -> dict:
    """Read config.json (a checkpoint directory or the file itself) as a dict."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no config.json found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return cfg


def load_args(path: str | Path) -> ModelArgs:
    return args_from_dict(load_config(path))
