"""The seam between the model and the math: weight containers every backend fills, and the
operations a backend provides. `moemesh.model` is written against this and nothing else, so a backend
(torch today, MLX beside it) plugs in without touching loading, generation or transport.

Arrays are the backend's own (torch.Tensor, mx.array); activations are 2-D [tokens, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Array = Any  # the backend's array type
Weight = Any  # a linear weight in the backend's resident form (dense, FP8 + block scales, ...)


@dataclass
class MlpWeights:
    gate: Weight  # [inter, hidden]
    up: Weight  # [inter, hidden]
    down: Weight  # [hidden, inter]


@dataclass
class MoeWeights:
    router: Array  # [n_routed, hidden] float32
    bias: Array  # [n_routed] float32; shifts expert *choice* only
    experts: dict[int, MlpWeights]  # routed experts held here, by global id
    shared: MlpWeights | None


@dataclass
class AttentionWeights:
    q_proj: Weight | None  # [heads*qk_head, hidden] when q_lora_rank is null
    q_a_proj: Weight | None  # [q_lora, hidden]
    q_a_bias: Array | None
    q_a_norm: Array | None
    q_b_proj: Weight | None  # [heads*qk_head, q_lora]
    kv_a_proj: Weight  # [kv_lora + rope, hidden]
    kv_a_bias: Array | None
    kv_a_norm: Array  # [kv_lora]
    w_uk: Weight  # [heads, kv_lora, nope]: kv_b_proj's key half (transposed), folded into the query
    w_uv: Weight  # [heads, v, kv_lora]: kv_b_proj's value half, folded into the output
    o_proj: Weight  # [hidden, heads*v]
    o_bias: Array | None


class Backend(Protocol):
    name: str
    element_size: int  # bytes per activation / KV-cache element

    # checkpoint tensors (torch, CPU, as read) -> resident weights
    # `scales`: None (a float weight), FP8 block scales, or kernels.formats.AffineScales (MLX int4/int8)
    def linear_weight(self, weight: Any, scales: Any | None) -> Weight: ...
    def vector(self, t: Any, fp32: bool = False) -> Array: ...
    def absorbed_kv_b(self, weight: Any, scales: Any | None) -> tuple[Weight, Weight]: ...
    # kv_b_proj split as mlx-lm stores it: (weight, scales) per half, dense or packed
    def absorbed_heads(self, w_uk: tuple[Any, Any | None], w_uv: tuple[Any, Any | None]) -> tuple[Weight, Weight]: ...

    # the wire's edge: CPU torch tensors (what crosses the network) in and out, dtype and bits unchanged
    def from_host(self, t: Any) -> Array: ...
    def to_host(self, x: Array) -> Any: ...
    def held_bytes(self) -> int: ...  # what the backend's allocator holds (MLX arrays, CUDA memory); 0: not known

    # arrays
    def tokens(self, ids: list[int]) -> Array: ...
    def empty(self, rows: int, width: int) -> Array: ...
    def concat(self, xs: list[Array]) -> Array: ...  # along the last dim
    def to_numpy(self, x: Array) -> np.ndarray: ...
    def step(self, segments: list) -> Any: ...  # per-step context attention needs (positions, rope)
    def release_scratch(self, tokens: int) -> None: ...  # after a step of `tokens`: return a long step's freed buffers

    # math
    def embed(self, table: Array, ids: Array) -> Array: ...
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array: ...
    def linear(self, x: Array, w: Weight, bias: Array | None = None) -> Array: ...
    def mlp(self, w: MlpWeights, x: Array) -> Array: ...
    def attention(self, w: AttentionWeights, x: Array, step: Any, layer: int) -> Array: ...
    def route(self, w: MoeWeights, x: Array) -> tuple[Array, Array]: ...
    def moe(self, w: MoeWeights, x: Array, ids: Array, weights: Array) -> Array: ...  # routed + shared
    def experts(self, w: MoeWeights, x: Array, ids: Array, weights: Array) -> Array: ...
    def expert_counts(self, ids: Array) -> Array: ...
    # expert sharding: per-(token, expert) terms computed where the experts live, summed where attention runs
    def expert_rows(self, experts: dict[int, MlpWeights], x: Array, token: Array, expert: Array, weight: Array) -> Array: ...
    def combine_pairs(self, ids: Array, pairs: Array) -> Array: ...
