"""The CPU kernels (csrc/) against the pure-torch path they replace, which the float32 tests hold to
transformers. Each op is compared on random inputs of awkward sizes, then a whole bf16 model; every test runs at
each instruction-set level this CPU offers (test_isa.py's `level`)."""

import pytest
import torch
import torch.nn.functional as F
from hf_reference import SHAPES, build_checkpoint, make_config
from test_isa import kernels, level  # noqa: F401 (fixtures)

import moemesh
from moemesh.kernels.base import MlpWeights, MoeWeights
from moemesh.kernels.torch_backend import TorchBackend
from moemesh.model.cache import KVCache, Segment
from moemesh.spec.config import args_from_dict

gen = torch.Generator().manual_seed(0)


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).bfloat16()


def bf16_close(a: torch.Tensor, b: torch.Tensor, ulps: int) -> bool:
    """Within `ulps` bf16 rounding steps of each value, or of the typical magnitude where terms cancel."""
    a, b = a.float(), b.float()
    return bool(((a - b).abs() <= ulps * 2**-8 * (b.abs() + b.abs().mean())).all())


def backends(cfg: dict) -> tuple[TorchBackend, TorchBackend]:
    args = args_from_dict(cfg)
    fast, plain = TorchBackend(args, "bfloat16"), TorchBackend(args, "bfloat16")
    plain.kernels = None
    assert fast.kernels is not None
    return fast, plain


CFG = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=200, intermediate_size=300, num_hidden_layers=2,
           num_attention_heads=3, kv_lora_rank=40, q_lora_rank=None, qk_nope_head_dim=17, qk_rope_head_dim=10,
           v_head_dim=21, moe_intermediate_size=70, n_routed_experts=12, n_shared_experts=1, num_experts_per_tok=3,
           n_group=3, topk_group=2, first_k_dense_replace=1, max_position_embeddings=256)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n, k", [(1, 7), (5, 33), (130, 1000), (257, 64)])
def test_linear_bf16(kernels, m, n, k):
    x, w = rand(m, k), rand(n, k)
    expected = F.linear(x.float(), w.float())
    got = kernels.linear_bf16(x, w).float()
    assert ((got - expected).abs() <= 0.008 * expected.abs() + 1e-3 * k**0.5).all()


def test_linear_heads_matches_bmm(level):
    x, w = rand(3, 5, 33), rand(5, 70, 33)
    expected = torch.bmm(x.float().transpose(0, 1), w.float().transpose(1, 2)).transpose(0, 1)
    fast, _ = backends(CFG)
    assert torch.allclose(fast.linear_heads(x, w).float(), expected, rtol=0.01, atol=0.02)


def test_rms_norm_and_mlp_round_like_torch(level):
    fast, plain = backends(CFG)
    x, weight = rand(4, 200), rand(200)
    assert bf16_close(fast.rms_norm(x, weight, 1e-6), plain.rms_norm(x, weight, 1e-6), 1)
    mlp = MlpWeights(rand(70, 200, scale=0.1), rand(70, 200, scale=0.1), rand(200, 70, scale=0.1))
    assert bf16_close(fast.mlp(mlp, x), plain.mlp(mlp, x), 2)


def test_route_and_experts_match_torch(level):
    fast, plain = backends(CFG)
    moe = MoeWeights(router=torch.randn(12, 200, generator=gen), bias=torch.randn(12, generator=gen) * 0.1,
                     experts={e: MlpWeights(rand(70, 200, scale=0.1), rand(70, 200, scale=0.1), rand(200, 70, scale=0.1))
                              for e in range(12)}, shared=None)
    x = rand(5, 200, scale=0.05)
    ids_f, w_f = fast.route(moe, x)
    ids_p, w_p = plain.route(moe, x)
    order_f, order_p = ids_f.sort(dim=1), ids_p.sort(dim=1)
    assert torch.equal(order_f.values, order_p.values)
    assert torch.allclose(w_f.gather(1, order_f.indices), w_p.gather(1, order_p.indices), rtol=1e-5)
    for n in (1, 5):
        out_f = fast.experts(moe, x[:n], ids_p[:n], w_p[:n])
        out_p = plain.experts(moe, x[:n], ids_p[:n], w_p[:n])
        assert bf16_close(out_f, out_p, 4)
        # expert sharding's path: the per-pair terms, summed where attention runs, give the same sums
        token = torch.arange(n).repeat_interleave(3)
        pairs = plain.expert_rows(moe.experts, x[:n], token, ids_p[:n].flatten(), w_p[:n].flatten())
        assert torch.equal(plain.combine_pairs(ids_p[:n], pairs.view(n, 3, -1)), out_p)


def test_moe_layer_holds_a_subset_of_experts_in_any_order(level):
    """A node may hold some of a layer's experts, keyed in any order: the kernels' held view of them adds them in
    ascending expert order, then the shared expert, as torch does; an expert not held is an error naming it (the
    scalar level multiplies with torch, not the kernels' view)."""
    fast, plain = backends(CFG)

    def mlp():
        return MlpWeights(rand(70, 200, scale=0.1), rand(70, 200, scale=0.1), rand(200, 70, scale=0.1))

    moe = MoeWeights(router=torch.randn(12, 200, generator=gen), bias=torch.zeros(12),
                     experts={e: mlp() for e in (9, 2, 5, 11)}, shared=mlp())
    x = rand(3, 200, scale=0.05)
    ids, weights = torch.tensor([[9, 2], [5, 11], [11, 9]]), torch.rand(3, 2, generator=gen)
    for n in (1, 3):
        assert bf16_close(fast.moe(moe, x[:n], ids[:n], weights[:n]), plain.moe(moe, x[:n], ids[:n], weights[:n]), 4)
        assert bf16_close(fast.experts(moe, x[:n], ids[:n], weights[:n]), plain.experts(moe, x[:n], ids[:n], weights[:n]), 4)
    if level != "scalar":
        with pytest.raises(RuntimeError, match="expert 3 is not held"):
            fast.moe(moe, x, torch.tensor([[3, 2]] * 3), weights)


def test_mla_decode_matches_torch_attention(level):
    fast, plain = backends(CFG)
    a = fast.args
    from moemesh.kernels.base import AttentionWeights

    w = AttentionWeights(q_proj=rand(3 * 27, 200, scale=0.1), q_a_proj=None, q_a_bias=None, q_a_norm=None,
                         q_b_proj=None, kv_a_proj=rand(50, 200, scale=0.1), kv_a_bias=None, kv_a_norm=rand(40),
                         w_uk=rand(3, 40, 17, scale=0.2), w_uv=rand(3, 21, 40, scale=0.2), o_proj=rand(200, 63, scale=0.1),
                         o_bias=None)
    caches = {b: KVCache(b, a.kv_cache_width, capacity=4) for b in (fast, plain)}  # small: growth is exercised
    prompt = rand(30, 200)
    for b in (fast, plain):  # the prompt goes through the torch path in both
        b.attention(w, prompt, b.step([Segment(caches[b], 0, 30)]), 0)
        caches[b].length = 30
    for start, n in [(30, 1), (31, 3), (34, 1)]:
        x = rand(n, 200)
        out = {b: b.attention(w, x, b.step([Segment(caches[b], start, n)]), 0) for b in (fast, plain)}
        for c in caches.values():
            c.length = start + n
        rows_f, rows_p = caches[fast].buffers[0][: start + n], caches[plain].buffers[0][: start + n]
        assert torch.equal(rows_f, rows_p)  # the same cache rows, rope included, bit for bit
        assert bf16_close(out[fast], out[plain], 8)


@pytest.mark.parametrize("shape", ["base", "odd_dims_4groups"])
def test_bf16_model_with_and_without_kernels(tmp_path, shape, level):
    config = make_config(**SHAPES[shape])
    build_checkpoint(tmp_path, config, seed=4)
    fast = moemesh.load(tmp_path, dtype="bfloat16")
    plain = moemesh.load(tmp_path, dtype="bfloat16")
    plain.backend.kernels = None
    ids = torch.randint(0, config.vocab_size, (40,), generator=gen).tolist()
    steps = {}
    for engine in (fast, plain):
        step = engine.step_fn(engine.new_cache())
        steps[engine] = [torch.from_numpy(step(ids[:20], 0))] + [torch.from_numpy(step([t], 20 + i)) for i, t in enumerate(ids[20:])]
    reference = plain.logits([ids])[0, 19:]  # the torch path, full sequence
    for got, want in ((steps[fast], reference), (steps[plain], reference)):
        err = (torch.stack(got) - want).abs()
        assert err.max() <= 0.05 * want.abs().max() and err.mean() <= 0.01 * want.abs().mean()
