"""The DeepSeek-V3 layer stack: the blocks a node holds and, on the head node, the embedding, final
norm, lm_head and MTP module. Written against `moemesh.kernels.base` only, so it runs the same on any
backend and on one machine or many (a node holding layers 10-19 runs `forward(x, ..., layers)`)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from ..kernels.base import AttentionWeights, Backend, MlpWeights, MoeWeights
from .cache import Segment
from .checkpoint import Checkpoint
from ..spec.config import ModelArgs
from ..spec.layout import attention_shapes, block_shapes, head_shapes, layer_prefix, mlp_shapes, mtp_head_shapes
from ..spec.routing import RoutingStats

Progress = Callable[[str, int, int], None]  # (what, done, total)
# For MoE layers whose routed experts live on several nodes: (layer, x [n, hidden], expert ids [n, k],
# routing weights [n, k]) -> the routed experts' weighted sum [n, hidden]. Set by the cluster runtime.
ExpertDispatch = Callable[[int, Any, Any, Any], Any]


@dataclass
class Block:
    layer: int
    input_norm: Any
    post_norm: Any
    attn: AttentionWeights
    ffn: MlpWeights | MoeWeights


@dataclass
class MtpModule:
    """Predicts the token after next from the main model's final (normed) hidden state h at position i
    and the embedding of token i+1: eh_proj([enorm(embed(t)), hnorm(h)]) -> block -> norm -> head."""
    enorm: Any
    hnorm: Any
    eh_proj: Any
    block: Block
    norm: Any
    head: Any


def _mlp(ckpt: Checkpoint, backend: Backend, prefix: str, hidden: int, inter: int) -> MlpWeights:
    parts = {k: backend.linear_weight(*ckpt.read_linear(prefix + k, s)) for k, s in mlp_shapes(hidden, inter).items()}
    return MlpWeights(parts["gate_proj.weight"], parts["up_proj.weight"], parts["down_proj.weight"])


def _attention(ckpt: Checkpoint, backend: Backend, prefix: str) -> AttentionWeights:
    shapes = {prefix + k: v for k, v in attention_shapes(ckpt.args).items()}

    def linear(name: str):
        return backend.linear_weight(*ckpt.read_linear(prefix + name, shapes[prefix + name]))

    def vector(name: str):
        return backend.vector(ckpt.read(prefix + name, shapes[prefix + name])) if prefix + name in shapes else None

    lora = ckpt.args.q_lora_rank is not None
    split = ckpt.read_split_kv_b(prefix)
    w_uk, w_uv = backend.absorbed_heads(*split) if split else backend.absorbed_kv_b(
        *ckpt.read_linear(prefix + "kv_b_proj.weight", shapes[prefix + "kv_b_proj.weight"]))
    return AttentionWeights(
        q_proj=None if lora else linear("q_proj.weight"),
        q_a_proj=linear("q_a_proj.weight") if lora else None,
        q_a_bias=vector("q_a_proj.bias"),
        q_a_norm=vector("q_a_layernorm.weight"),
        q_b_proj=linear("q_b_proj.weight") if lora else None,
        kv_a_proj=linear("kv_a_proj_with_mqa.weight"),
        kv_a_bias=vector("kv_a_proj_with_mqa.bias"),
        kv_a_norm=vector("kv_a_layernorm.weight"),
        w_uk=w_uk,
        w_uv=w_uv,
        o_proj=linear("o_proj.weight"),
        o_bias=vector("o_proj.bias"),
    )


def _check_experts(a: ModelArgs, layer: int, experts: Iterable[int]) -> list[int]:
    held = sorted(experts)
    for e in held:
        if not 0 <= e < a.n_routed_experts:
            raise ValueError(f"layer {layer}: expert {e} does not exist (n_routed_experts={a.n_routed_experts})")
    return held


def load_experts(ckpt: Checkpoint, backend: Backend, layer: int, experts: Iterable[int]) -> dict[int, MlpWeights]:
    """Routed experts of one MoE layer, without the rest of its block."""
    a = ckpt.args
    if not a.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is not a MoE layer")
    held = {}
    for e in _check_experts(a, layer, experts):
        mlp = _mlp(ckpt, backend, layer_prefix(layer) + f"mlp.experts.{e}.", a.hidden_size, a.moe_intermediate_size)
        mlp.gate, mlp.up = backend.fuse_gate_up(mlp.gate, mlp.up)  # one matmul for both, as the reference does
        held[e] = mlp
    return held


def load_block(ckpt: Checkpoint, backend: Backend, layer: int, experts: Iterable[int] | None = None) -> Block:
    a, p = ckpt.args, layer_prefix(layer)
    shapes = block_shapes(a, layer, experts=[])  # routed experts are checked one by one below
    norm_shape = (a.hidden_size,)
    if a.is_moe_layer(layer):
        held = range(a.n_routed_experts) if experts is None else _check_experts(a, layer, experts)
        router = ckpt.read(p + "mlp.gate.weight", shapes[p + "mlp.gate.weight"])
        bias_name = p + "mlp.gate.e_score_correction_bias"
        ffn: MlpWeights | MoeWeights = MoeWeights(
            router=backend.vector(router, fp32=True),
            bias=backend.vector(ckpt.read(bias_name, shapes[bias_name]), fp32=True),
            experts=load_experts(ckpt, backend, layer, held),
            shared=_mlp(ckpt, backend, p + "mlp.shared_experts.", a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
            if a.n_shared_experts else None,
        )
    else:
        ffn = _mlp(ckpt, backend, p + "mlp.", a.hidden_size, a.intermediate_size)
    return Block(
        layer=layer,
        input_norm=backend.vector(ckpt.read(p + "input_layernorm.weight", norm_shape)),
        post_norm=backend.vector(ckpt.read(p + "post_attention_layernorm.weight", norm_shape)),
        attn=_attention(ckpt, backend, p + "self_attn."),
        ffn=ffn,
    )


class Transformer:
    def __init__(self, args: ModelArgs, backend: Backend, blocks: dict[int, Block], embed: Any = None,
                 norm: Any = None, lm_head: Any = None, mtp: list[MtpModule] | None = None,
                 held_experts: dict[int, dict[int, MlpWeights]] | None = None):
        self.args = args
        self.backend = backend
        self.blocks = blocks
        self.embed_table, self.norm, self.lm_head = embed, norm, lm_head
        self.mtp = mtp or []
        self.held_experts = held_experts or {}  # routed experts of layers led elsewhere (expert sharding)
        self.expert_counts: dict[int, Any] = {}  # layer -> tokens routed to each expert (backend array)
        self.dispatch: ExpertDispatch | None = None
        self.dispatch_layers: set[int] = set()  # layers whose experts `dispatch` must gather from other nodes

    @classmethod
    def load(cls, ckpt: Checkpoint, backend: Backend, layers: Iterable[int] | None = None, head: bool = True,
             mtp: bool = True, experts: dict[int, list[int]] | None = None, progress: Progress | None = None
             ) -> Transformer:
        """Load the given layers (default: all) and, with `head`, embedding/norm/lm_head and the MTP module
        when the checkpoint has it. `experts` limits the routed experts held per layer (expert sharding);
        for a layer not in `layers` it loads just those routed experts, for a lead on another node."""
        a = ckpt.args
        layers = list(range(a.num_hidden_layers) if layers is None else layers)
        for layer in layers:
            if not 0 <= layer < a.num_hidden_layers:
                raise ValueError(f"layer {layer} does not exist (num_hidden_layers={a.num_hidden_layers})")
        mtp_layers = [m for m in a.mtp_layers if ckpt.has(layer_prefix(m) + "eh_proj.weight")] if head and mtp else []
        expert_only = {layer: ids for layer, ids in (experts or {}).items() if layer not in layers}
        total, done = len(layers) + len(expert_only) + len(mtp_layers) + int(head), 0

        def tick(what: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(what, done, total)

        blocks = {}
        for layer in layers:
            blocks[layer] = load_block(ckpt, backend, layer, (experts or {}).get(layer))
            tick(f"layer {layer}")
        held = {}
        for layer, ids in sorted(expert_only.items()):
            held[layer] = load_experts(ckpt, backend, layer, ids)
            tick(f"experts of layer {layer}")
        embed = norm = lm_head = None
        modules = []
        if head:
            shapes = head_shapes(a)
            # a linear weight's form: quantized checkpoints (mlx-lm's) quantize the embedding too
            embed = backend.linear_weight(*ckpt.read_linear("model.embed_tokens.weight", shapes["model.embed_tokens.weight"]))
            norm = backend.vector(ckpt.read("model.norm.weight", shapes["model.norm.weight"]))
            lm_head = embed if a.tie_word_embeddings else backend.linear_weight(
                *ckpt.read_linear("lm_head.weight", shapes["lm_head.weight"]))
            tick("embedding and head")
            for m in mtp_layers:
                modules.append(_load_mtp(ckpt, backend, m, lm_head))
                tick(f"MTP layer {m}")
        model = cls(a, backend, blocks, embed, norm, lm_head, modules, held)
        # Take the weights' Python objects (a few per expert) out of the cyclic collector's sight: its full
        # collections during decode would traverse them all (~5% of decode time). Refcounting still frees them.
        gc.freeze()
        return model

    @property
    def layers(self) -> list[int]:
        return sorted(self.blocks)

    @property
    def weight_bytes(self) -> int:
        """Bytes of resident weights (arrays shared by two parts, like a tied lm_head, count once)."""
        leaves: dict[int, int] = {}
        for leaf in _leaves([self.blocks, self.embed_table, self.norm, self.lm_head, self.mtp, self.held_experts]):
            leaves[id(leaf)] = leaf.nbytes
        return sum(leaves.values())

    # ---- forward pieces
    def embed(self, ids: list[int]) -> Any:
        return self.backend.embed(self.embed_table, self.backend.tokens(ids))

    def forward(self, x: Any, segments: list[Segment], layers: Iterable[int] | None = None) -> Any:
        """Run hidden states [tokens, hidden] through the held layers (or `layers`), writing the KV cache."""
        _open(segments)
        step = self.backend.step(segments)
        for layer in self.layers if layers is None else layers:
            x = self._block(self.blocks[layer], x, step)
        for s in segments:
            s.cache.length = s.start + s.length
        self.backend.release_scratch(sum(s.length for s in segments))
        return x

    def final_norm(self, x: Any) -> Any:
        return self.backend.rms_norm(x, self.norm, self.args.rms_norm_eps)

    def lm_logits(self, h: Any) -> Any:
        """Logits from normed final hidden states."""
        return self.backend.linear(h, self.lm_head)

    def head(self, x: Any) -> tuple[Any, Any]:
        """Final norm and lm_head: returns (normed hidden state, logits)."""
        h = self.final_norm(x)
        return h, self.lm_logits(h)

    def mtp_logits(self, hidden: Any, next_ids: list[int], segments: list[Segment], depth: int = 0,
                   rows: list[int] | None = None) -> tuple[Any, Any]:
        """MTP draft: `hidden` [tokens, hidden] are the main model's normed final states at positions p, and
        next_ids the tokens at p+1; returns (MTP hidden state, logits for the tokens at p+2, of `rows` only
        when given). The segments give positions p and the MTP layer's own KV cache. As in vLLM, the embedding
        at position 0 is zeroed."""
        if depth >= len(self.mtp):
            raise ValueError(f"this checkpoint has {len(self.mtp)} MTP layer(s) loaded; depth {depth} is not available")
        m, b, eps = self.mtp[depth], self.backend, self.args.rms_norm_eps
        _open(segments)
        e = self.embed(next_ids)
        offset = 0
        for s in segments:
            if s.start == 0:
                e[offset] = 0
            offset += s.length
        x = b.linear(b.concat([b.rms_norm(e, m.enorm, eps), b.rms_norm(hidden, m.hnorm, eps)]), m.eh_proj)
        step = b.step(segments)
        x = self._block(m.block, x, step)
        for s in segments:
            s.cache.length = s.start + s.length
        y = x if rows is None else x[b.tokens(rows)]
        return x, b.linear(b.rms_norm(y, m.norm, eps), m.head)

    def _block(self, blk: Block, x: Any, step: Any) -> Any:
        b, eps = self.backend, self.args.rms_norm_eps
        h = x + b.attention(blk.attn, b.rms_norm(x, blk.input_norm, eps), step, blk.layer)
        y = b.rms_norm(h, blk.post_norm, eps)
        if isinstance(blk.ffn, MlpWeights):
            return h + b.mlp(blk.ffn, y)
        ids, weights = b.route(blk.ffn, y)
        self.expert_counts[blk.layer] = self.expert_counts.get(blk.layer, 0) + b.expert_counts(ids)
        if blk.layer not in self.dispatch_layers:
            return h + b.moe(blk.ffn, y, ids, weights)
        out = self.dispatch(blk.layer, y, ids, weights)  # routed experts on several nodes
        return h + (out if blk.ffn.shared is None else out + b.mlp(blk.ffn.shared, y))

    def routing_stats(self) -> RoutingStats:
        """Tokens routed to each expert of each held MoE layer since load (MTP layer included)."""
        stats = RoutingStats(self.args.n_routed_experts)
        for layer, counts in sorted(self.expert_counts.items()):
            row = [int(c) for c in self.backend.to_numpy(counts).tolist()]
            stats.add(layer, row)
            stats.tokens = max(stats.tokens, sum(row) // max(self.args.num_experts_per_tok, 1))
        return stats


def _open(segments: list[Segment]) -> None:
    """Each segment writes its cache from `start` on: a start below the cache's length rolls it back to there
    first (rejected speculative tokens), one beyond it is refused."""
    for s in segments:
        if s.start > s.cache.length:
            raise ValueError(f"step starts at position {s.start} but the cache holds only {s.cache.length} tokens")
        s.cache.truncate(s.start)


def _leaves(obj: Any) -> Iterable[Any]:
    """Arrays (anything with `nbytes`) inside nested containers and dataclasses."""
    if hasattr(obj, "nbytes"):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif is_dataclass(obj):
        for f in fields(obj):
            yield from _leaves(getattr(obj, f.name))


def _load_mtp(ckpt: Checkpoint, backend: Backend, layer: int, lm_head: Any) -> MtpModule:
    a, p = ckpt.args, layer_prefix(layer)
    shapes = {p + k: v for k, v in mtp_head_shapes(a).items()}

    def vector(name: str):
        return backend.vector(ckpt.read(p + name, shapes[p + name]))

    head_name = p + "shared_head.head.weight"
    head = lm_head
    if ckpt.has(head_name):  # the released checkpoint stores its own copy; the main lm_head serves otherwise
        head = backend.linear_weight(*ckpt.read_linear(head_name, (a.vocab_size, a.hidden_size)))
    return MtpModule(
        enorm=vector("enorm.weight"),
        hnorm=vector("hnorm.weight"),
        eh_proj=backend.linear_weight(*ckpt.read_linear(p + "eh_proj.weight", shapes[p + "eh_proj.weight"])),
        block=load_block(ckpt, backend, layer),
        norm=vector("shared_head.norm.weight"),
        head=head,
    )
