"""The quantized-weight kernels (csrc/quant.cpp, quant_avx2.h) against the dequantize-then-multiply they replace:
FP8 e4m3 byte by byte (subnormals included), int4/int8 for every group size on awkward shapes, fused MLP and
experts, whole FP8 and int4/int8 bf16 models with and without the kernels, and torch's FP8 matmul where a Hopper
GPU is. The kernel tests run at each instruction-set level this CPU offers (test_isa.py's `level`)."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_isa import kernels, level  # noqa: F401 (fixtures)
from test_quantization import DIMS

import moemesh
from moemesh.kernels.affine import AffineWeight, affine_embed, lanes_fit, to_lanes
from moemesh.kernels.base import MlpWeights, MoeWeights
from moemesh.kernels.fp8 import Fp8Weight, dequantize as fp8_dequantize, scaled_mm_linear, scaled_mm_supported
from moemesh.kernels.quant_ops import kernel_args
from moemesh.kernels.torch_backend import TorchBackend
from moemesh.kernels.formats import quantize
from moemesh.spec.config import args_from_dict
from moemesh.model.model import _leaves
from moemesh.quantize import Recipe, convert

gen = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    """Each test's random weights depend on its name only, not on which tests ran before it."""
    gen.manual_seed(0)


def e4m3_value(byte: int) -> float:
    """The OCP e4m3 encoding, from its definition: bias 7, subnormals m * 2^-9, no infinities."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 15, byte & 7
    return sign * (m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def fp8_weight(out: int, inp: int, normals_only: bool = False) -> Fp8Weight:
    q = torch.randint(0, 256, (out, inp), dtype=torch.uint8, generator=gen)
    q[(q & 0x7F) == 0x7F] = 0  # no NaN encodings
    if normals_only:  # no zero or subnormal byte: the kernel's fast path (a real checkpoint's usual case)
        q[(q & 0x78) == 0] |= 0x08
    scale = torch.rand(math.ceil(out / 128), math.ceil(inp / 128), generator=gen) + 0.5
    return Fp8Weight(q.view(torch.float8_e4m3fn), scale, (128, 128))


def affine(out: int, inp: int, bits: int, group: int) -> AffineWeight:
    words, s = quantize(torch.randn(out, inp, generator=gen) * 0.05, bits, group)
    return AffineWeight(words.view(torch.int32), s.scales.bfloat16(), s.biases.bfloat16(), bits, group)


def fp8_blocks_dequantized(w: Fp8Weight) -> tuple[torch.Tensor, None]:
    return fp8_dequantize(w), None


def dense(w) -> torch.Tensor:
    """The weight in float32: what the kernels' products are held to."""
    if isinstance(w, Fp8Weight):
        return fp8_dequantize(w)
    from moemesh.kernels.affine import to_dense
    return to_dense(w, torch.float32)


def close(got: torch.Tensor, want: torch.Tensor, k: int) -> bool:
    """Within bf16 output rounding plus fp32 accumulation noise of a k-term sum."""
    return bool(((got.float() - want).abs() <= 2**-8 * want.abs() + 1e-5 * k**0.5 * want.abs().max()).all())


def test_fp8_bytes_decode_exactly(kernels):
    """All 256 encodings through the decode kernel (x = one-hot) and the tile dequantizer, against e4m3_value."""
    table = torch.tensor([e4m3_value(b) for b in range(256)])
    q = torch.arange(256, dtype=torch.uint8).view(2, 128)
    scale = torch.ones(1, 1)
    args = (q, scale, torch.empty(0), 1, 128)
    ok = torch.isfinite(table.view(2, 128))  # 0x7F and 0xFF are NaN in e4m3: the kernels need not agree
    tile = kernels.dequantize_q(args, 0, 2).float()
    assert torch.equal(tile[ok], table.view(2, 128).bfloat16().float()[ok])
    tile = kernels.dequantize_q(args, 0, 2, torch.empty(2, 128))  # float32 bands (decode steps without vector kernels)
    assert torch.equal(tile[ok], table.view(2, 128)[ok])
    x = torch.eye(128).bfloat16()  # 128 tokens, in passes of up to 8 (decode kernel, any number of rows)
    got = torch.cat([kernels.linear_q(x[i : i + 8], args) for i in range(0, 128, 8)]).float().T  # [2, 128]
    assert torch.equal(got[ok], table.view(2, 128).bfloat16().float()[ok])
    # the fast path (chunks of 64 bytes without zeros or subnormals): every normal encoding, 64 at a time
    normal = torch.tensor([b for b in range(256) if (b & 0x78) and (b & 0x7F) != 0x7F], dtype=torch.uint8)
    q = normal[torch.randperm(len(normal), generator=gen)][:192].view(3, 64)
    got = kernels.linear_q(torch.eye(64).bfloat16(), (q, torch.ones(1, 1), torch.empty(0), 1, 128)).float().T
    assert torch.equal(got, table[q.long()].bfloat16().float())


@pytest.mark.parametrize("m", [1, 3, 5, 8])
@pytest.mark.parametrize("shape", [(300, 200), (130, 1000), (4, 72), (257, 128)])
def test_fp8_linear(kernels, m, shape):
    x = torch.randn(m, shape[1], generator=gen).bfloat16()
    for normals_only in (False, True):
        w = fp8_weight(*shape, normals_only)
        assert close(kernels.linear_q(x, kernel_args(w)), x.float() @ dense(w).T, shape[1])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_affine_linear(kernels, bits, group, m):
    for out, inp in ((37, 256), (70, 3 * group), (5, group), (130, 2048 + group)):
        w = affine(out, inp, bits, group)
        x = torch.randn(m, inp, generator=gen).bfloat16()
        want = x.float() @ dense(w).T
        assert close(kernels.linear_q(x, kernel_args(w)), want, inp), (out, inp)
        tile = kernels.dequantize_q(kernel_args(w), 0, out)
        assert torch.equal(tile, dense(w).bfloat16())
        tile = kernels.dequantize_q(kernel_args(w), 0, out, torch.empty(out, inp))
        assert ((tile - dense(w)).abs() <= 2**-22 * dense(w).abs().max()).all()  # q s + b: one rounding or two


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_lane_major_layout(kernels, bits, group, m):
    """Weights of whole 16-group spans, held in the kernels' lane-major byte order: the same weight (words, dense,
    dequantized tiles) and the same products as the MLX layout — whole rows per span, or spans across rows (2 or
    8 rows per span, or 12 and 24 groups per row, which cross at 4 or 8 lanes)."""
    for out, inp in ((37, 16 * group), (70, 48 * group), (40, 2 * group), (16, group), (6, 8 * group),
                     (36, 12 * group), (26, 24 * group)):
        w = affine(out, inp, bits, group)
        assert lanes_fit(w)
        lanes = to_lanes(w, kernels)
        assert torch.equal(lanes.weight, to_lanes(w).weight)  # C++ and torch: the same layout
        assert not torch.equal(lanes.weight, w.weight) and torch.equal(lanes.words(), w.weight)
        assert torch.equal(dense(lanes), dense(w))
        assert torch.equal(kernels.dequantize_q(kernel_args(lanes), 3, out), kernels.dequantize_q(kernel_args(w), 3, out))
        x = torch.randn(m, inp, generator=gen).bfloat16()
        got = kernels.linear_q(x, kernel_args(lanes))
        assert close(got, x.float() @ dense(w).T, inp)
        rows = torch.arange(out - 1, -1, -3)
        assert torch.equal(affine_embed(lanes, rows, torch.float32), affine_embed(w, rows, torch.float32))
    assert not lanes_fit(affine(7, 2 * group, bits, group)) and not lanes_fit(to_lanes(w))
    with pytest.raises(ValueError, match="cut a 16-group span"):
        to_lanes(affine(40, 2 * group, bits, group)).rows(4, 12)


@pytest.mark.parametrize("scale", [1e-30, 1e-9, 1e9, 1e30])
def test_activations_far_from_one(kernels, scale):
    """Tokens at the ends of bf16's range, one of them with a zero half: the avx2 kernels scale each token (FP8) or
    group (affine) of x by a power of two that the results undo, which must neither overflow nor underflow."""
    x = (torch.randn(3, 320, generator=gen) * scale).bfloat16()
    x[1, :160] = 0
    x[2, :64] *= 1e-3  # a group of small values beside large ones
    for w in (fp8_weight(200, 320), to_lanes(affine(40, 320, 4, 32), kernels), to_lanes(affine(48, 320, 8, 64), kernels)):
        assert close(kernels.linear_q(x, kernel_args(w)), x.float() @ dense(w).T, 320), w


@pytest.mark.parametrize("group", [32, 64, 128])
def test_lane_major_heads(kernels, group):
    """Per-head products over stacked heads held lane-major, as MLA's W_UK (128 inputs: 1-4 groups per row, many rows
    per span) and W_UV are; a head that would cut a span is refused."""
    heads, n = 4, 2
    for rows, inp in ((64, 128), (16, 512)):
        w = affine(heads * rows, inp, 4, group)
        x = torch.randn(n, heads, inp, generator=gen).bfloat16()
        want = torch.einsum("nhk,hok->nho", x.float(), dense(w).view(heads, rows, inp))
        assert close(kernels.linear_heads_q(x, kernel_args(to_lanes(w, kernels))), want, inp)
    w = to_lanes(affine(heads * 2, 2 * group, 4, group), kernels)  # 4 groups per head
    with pytest.raises(RuntimeError, match="whole spans"):
        kernels.linear_heads_q(torch.randn(1, heads, 2 * group).bfloat16(), kernel_args(w))


def test_huge_page_arena_hands_out_separate_aligned_tensors():
    from moemesh.kernels.memory import HugePageArena

    arena = HugePageArena()
    shapes = [(3, 5), (1000, 1000), (7,), (HugePageArena.CHUNK // 8, 2), (64, 64)]  # the 4th is a region of its own
    tensors = [arena.empty(shape, torch.int32) for shape in shapes]
    for i, t in enumerate(tensors):
        assert t.shape == shapes[i] and t.data_ptr() % 64 == 0
        t.fill_(i)
    for i, t in enumerate(tensors):  # nothing written through one tensor shows in another
        assert (t == i).all()
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_backend_holds_whole_span_weights_lane_major(level):
    """linear_weight repacks what the kernels can take lane-major (and only where their vector code runs); experts,
    MLPs and embedding rows read it back right, decode and prefill."""
    from moemesh.kernels.formats import AffineScales

    args = args_from_dict(dict(model_type="deepseek_v3", vocab_size=64, hidden_size=512, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=32, q_lora_rank=None,
                               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16))
    fast, plain = TorchBackend(args, "bfloat16"), TorchBackend(args, "bfloat16")
    plain.kernels = None

    def load(backend, out, inp, group):
        w = affine(out, inp, 4, group)
        return backend.linear_weight(w.weight.view(torch.uint32), AffineScales(w.scales, w.biases, 4, group))

    state, held = gen.get_state(), {}
    for b in (fast, plain):  # the same weights for both
        gen.set_state(state)
        held[b] = [load(b, 512, 512, 32), load(b, 512, 512, 64), load(b, 512, 1024, 64), load(b, 512, 512, 32)]
    assert all(w.lanes == (level != "scalar") for w in held[fast]) and not any(w.lanes for w in held[plain])
    for table in (0, 1):  # 16 groups per row, and 8 (two rows per span)
        for ids in ([5, 300, 5], list(range(0, 512, 40))):  # decode rows (C++), prefill rows (torch)
            want = fast.embed(held[plain][table], torch.tensor(ids))
            assert torch.equal(fast.embed(held[fast][table], torch.tensor(ids)), want)
    x = torch.randn(3, 512, generator=gen).bfloat16()
    mlp = {b: MlpWeights(held[b][0], held[b][3], held[b][1]) for b in (fast, plain)}  # down: 512 inputs, g64
    want = plain.mlp(mlp[plain], x).float()
    assert ((fast.mlp(mlp[fast], x).float() - want).abs() <= 0.02 * want.abs().max()).all()


def test_fused_mlp_and_experts_match_the_unfused_path(level):
    args = args_from_dict(dict(model_type="deepseek_v3", vocab_size=64, hidden_size=256, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=32, q_lora_rank=None,
                               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, moe_intermediate_size=128,
                               n_routed_experts=6, num_experts_per_tok=2, first_k_dense_replace=1))
    fast, plain = TorchBackend(args, "bfloat16"), TorchBackend(args, "bfloat16")
    plain.kernels = None
    kinds = [lambda o, i: affine(o, i, 4, 64), lambda o, i: affine(o, i, 8, 32), fp8_weight]
    experts = {e: MlpWeights(kinds[e % 3](128, 256), kinds[(e + 1) % 3](128, 256), kinds[(e + 2) % 3](256, 128))
               for e in range(6)}  # every format, mixed inside one MLP too
    x = torch.randn(3, 256, generator=gen).bfloat16()
    for mlp in experts.values():
        want = plain.mlp(mlp, x).float()
        assert ((fast.mlp(mlp, x).float() - want).abs() <= 0.02 * want.abs().max()).all()
    ids = torch.tensor([[0, 3], [1, 5], [3, 4]])
    weights = torch.rand(3, 2, generator=gen)
    moe = MoeWeights(router=None, bias=None, experts=experts, shared=None)
    want = plain.experts(moe, x, ids, weights).float()
    assert ((fast.experts(moe, x, ids, weights).float() - want).abs() <= 0.02 * want.abs().max()).all()


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (8, 32), ("fp8", 128)])
def test_packed_heads_in_mla_decode(level, bits, group):
    """MLA's W_UK and W_UV packed as mlx-lm stores them (`embed_q`, `unembed_out`), or FP8 (kv_b_proj's 128x128
    blocks, the key half transposed block by block): the decode kernel against torch's attention over the
    dequantized heads. Cache rows must agree to bf16 rounding (kv_a's matmul sums in another order here)."""
    from moemesh.kernels.base import AttentionWeights
    from moemesh.kernels.formats import AffineScales
    from moemesh.model.cache import KVCache, Segment

    heads, nope, kv_lora, v = 3, group, 2 * group, group
    args = args_from_dict(dict(model_type="deepseek_v3", vocab_size=64, hidden_size=96, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=heads, kv_lora_rank=kv_lora, q_lora_rank=None,
                               qk_nope_head_dim=nope, qk_rope_head_dim=16, v_head_dim=v, moe_intermediate_size=32,
                               n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                               quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))
    fast, plain = TorchBackend(args, "bfloat16"), TorchBackend(args, "bfloat16")
    plain.kernels = None

    def packed(*shape):  # [heads, out, in] as stored: uint32 words, scales and biases per group of `in`
        words, s = quantize(torch.randn(*shape, generator=gen) * 0.2, bits, group)
        return words, AffineScales(s.scales.bfloat16(), s.biases.bfloat16(), bits, group)

    if bits == "fp8":
        kv_b = fp8_weight(heads * (nope + v), kv_lora, normals_only=True)
        w_uk, w_uv = fast.absorbed_kv_b(kv_b.weight, kv_b.scale_inv)
        dense_uk, _ = plain.absorbed_kv_b(*fp8_blocks_dequantized(kv_b))
        assert torch.equal(dense(w_uk).bfloat16().view(heads, kv_lora, nope), dense_uk)  # block transpose is exact
        assert isinstance(w_uv, Fp8Weight)
    else:
        w_uk, w_uv = fast.absorbed_heads(packed(heads, kv_lora, nope), packed(heads, v, kv_lora))
        assert isinstance(w_uk, AffineWeight)
    assert w_uk.nbytes + w_uv.nbytes < 2 * heads * (nope + v) * kv_lora  # stays packed

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    w = AttentionWeights(q_proj=rand(heads * (nope + 16), 96, scale=0.1), q_a_proj=None, q_a_bias=None, q_a_norm=None,
                         q_b_proj=None, kv_a_proj=rand(kv_lora + 16, 96, scale=0.1), kv_a_bias=None,
                         kv_a_norm=rand(kv_lora), w_uk=w_uk, w_uv=w_uv, o_proj=rand(96, heads * v, scale=0.1), o_bias=None)
    caches = {b: KVCache(b, args.kv_cache_width, capacity=8) for b in (fast, plain)}
    prompt = rand(12, 96)
    for b in (fast, plain):  # the prompt: the torch path (dequantized heads) in both
        b.attention(w, prompt, b.step([Segment(caches[b], 0, 12)]), 0)
        caches[b].length = 12
    for start, n in [(12, 1), (13, 3)]:
        x = rand(n, 96)
        out = {b: b.attention(w, x, b.step([Segment(caches[b], start, n)]), 0) for b in (fast, plain)}
        for c in caches.values():
            c.length = start + n
        rows = {b: caches[b].buffers[0][: start + n].float() for b in (fast, plain)}
        assert ((rows[fast] - rows[plain]).abs() <= 2**-7 * rows[plain].abs()).all()  # one bf16 step
        want = out[plain].float()
        assert ((out[fast].float() - want).abs() <= 0.02 * want.abs().max()).all()


@pytest.mark.parametrize("bits, group, dims", [(4, 64, {}), (8, 32, {}),
                                               (4, 32, dict(hidden_size=512, moe_intermediate_size=512)),
                                               (8, 64, dict(hidden_size=1024, moe_intermediate_size=1024))])
def test_quantized_bf16_model_with_and_without_kernels(tmp_path, level, bits, group, dims):
    """Decode steps (kernels) and prefill (kernel-dequantized tiles) against torch's dequantize-and-multiply.
    With groups of 32 every MLA head weight is packed too; with 64, W_UK (32 wide) stays dense (as mlx-lm does).
    Every packed weight is held lane-major where the vector kernels run: at the small widths its spans cross rows.
    At the scalar level torch multiplies dequantized bands."""
    from test_quantization import hf_checkpoint

    convert(hf_checkpoint(tmp_path / "hf", **dims), tmp_path / "q", Recipe(bits=bits, group_size=group))
    fast = moemesh.load(tmp_path / "q", dtype="bfloat16")
    plain = moemesh.load(tmp_path / "q", dtype="bfloat16")
    plain.backend.kernels = None
    packed = [w for w in _leaves(fast.model.blocks) if isinstance(w, AffineWeight)]
    vector = level != "scalar"
    assert fast.model.lm_head.lanes == vector and packed and all(w.lanes == vector for w in packed)
    ids = torch.randint(0, DIMS["vocab_size"], (30,), generator=gen).tolist()
    step = fast.step_fn(fast.new_cache())
    got = torch.stack([torch.from_numpy(step(ids[:12], 0))] + [torch.from_numpy(step([t], 12 + i))
                                                                 for i, t in enumerate(ids[12:])])
    want = plain.logits([ids])[0, 11:]
    err = (got - want).abs()
    if not dims:
        assert err.max() <= 0.05 * want.abs().max() and err.mean() <= 0.01 * want.abs().mean()
        return
    # Wider layers: bf16 rounding (either side's) can flip a near-tie routing choice at a position, so hold the
    # typical position, its mean inside the bf16 model's own distance from float32.
    bf16_noise = (want - moemesh.load(tmp_path / "q", dtype="float32").logits([ids])[0, 11:]).abs().mean()
    assert err.max(1).values.median() <= 0.05 * want.abs().max() and err.mean(1).median() <= 0.75 * bf16_noise


def test_fp8_bf16_model_with_and_without_kernels(tmp_path, level):
    """An official-format FP8 checkpoint (128x128 blocks, partial at the edges): decode steps through the kernels
    (MoE and attention blocks, FP8 W_UK / W_UV included) against torch's dequantize-and-multiply."""
    from hf_reference import SHAPES, build_checkpoint, convert_to_fp8, make_config

    config = make_config(**SHAPES["base"])
    build_checkpoint(tmp_path / "hf", config, seed=5)
    convert_to_fp8(tmp_path / "hf", tmp_path / "fp8")
    fast = moemesh.load(tmp_path / "fp8", dtype="bfloat16")
    plain = moemesh.load(tmp_path / "fp8", dtype="bfloat16")
    plain.backend.kernels = None
    assert any(isinstance(w, Fp8Weight) for w in _leaves(fast.model.blocks))
    ids = torch.randint(0, config.vocab_size, (30,), generator=gen).tolist()
    step = fast.step_fn(fast.new_cache())
    got = torch.stack([torch.from_numpy(step(ids[:12], 0))] + [torch.from_numpy(step([t], 12 + i))
                                                                 for i, t in enumerate(ids[12:])])
    want = plain.logits([ids])[0, 11:]
    err = (got - want).abs()
    assert err.max() <= 0.05 * want.abs().max() and err.mean() <= 0.01 * want.abs().mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_scaled_mm_on_cuda():
    """torch's blockwise FP8 matmul (Hopper, CUDA >= 12.9) against the dequantized weight; elsewhere the
    band-wise dequantization serves and this only checks that it is chosen."""
    w = fp8_weight(256, 512)
    w = Fp8Weight(w.weight.cuda(), w.scale_inv.cuda(), w.block)
    x = torch.randn(4, 512, generator=gen).bfloat16().cuda()
    if not scaled_mm_supported(x, w):
        pytest.skip("this GPU has no blockwise FP8 matmul")
    want = x.float() @ dense(w).T
    got = scaled_mm_linear(x, w).float()
    assert ((got - want).abs() <= 0.05 * want.abs().max()).all()  # the activations are quantized to e4m3 too


def test_backend_uses_plain_torch_where_kernels_do_not_apply():
    """float32 compute: FP8 and affine weights go through torch's band-wise dequantization."""
    args = args_from_dict(dict(model_type="deepseek_v3", vocab_size=64, hidden_size=128, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=32, q_lora_rank=None,
                               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16))
    backend = TorchBackend(args, "float32")
    assert backend.kernels is None
    q4 = affine(600, 128, 4, 32)
    for w in (fp8_weight(600, 128), AffineWeight(q4.weight, q4.scales.float(), q4.biases.float(), 4, 32)):
        x = torch.randn(2, 128, generator=gen)
        assert torch.allclose(backend.linear(x, w), F.linear(x, dense(w)), atol=1e-5)
