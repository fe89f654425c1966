"""Byte accounting, checked by hand on single tensors and on the real DeepSeek-V3 config."""

import math

import pytest

from moemesh.spec.config import load_args
from moemesh.spec.sizes import WeightFormat, model_sizes, tensor_bytes, weight_format
from test_placement_support import REAL_CONFIG, tiny_args

needs_real = pytest.mark.skipif(not REAL_CONFIG.exists(), reason=f"real DeepSeek-V3 config not at {REAL_CONFIG}")


def test_linear_bytes_per_format():
    shape = (300, 256)  # 300 rows: fp8 blocks do not divide evenly
    assert tensor_bytes("x.q_b_proj.weight", shape, WeightFormat("bf16")) == 2 * 300 * 256
    assert tensor_bytes("x.q_b_proj.weight", shape, WeightFormat("fp8")) == 300 * 256 + 4 * 3 * 2
    # int4, groups of 64 along the input: 4 groups per row, each a bf16 scale and a bf16 bias
    assert tensor_bytes("x.q_b_proj.weight", shape, WeightFormat("int4")) == 300 * 256 // 2 + 300 * 4 * 4
    assert tensor_bytes("x.q_b_proj.weight", shape, WeightFormat("int8", group_size=32)) == 300 * 256 + 300 * 8 * 4


def test_kept_precision_tensors():
    fp8, int4 = WeightFormat("fp8"), WeightFormat("int4")
    assert tensor_bytes("model.layers.3.mlp.gate.weight", (256, 7168), fp8) == 4 * 256 * 7168
    assert tensor_bytes("model.layers.3.mlp.gate.weight", (256, 7168), int4) == 4 * 256 * 7168
    assert tensor_bytes("model.layers.3.self_attn.kv_b_proj.weight", (32768, 512), fp8) == 2 * 32768 * 512
    assert tensor_bytes("model.layers.3.mlp.gate.e_score_correction_bias", (256,), int4) == 4 * 256
    assert tensor_bytes("model.norm.weight", (7168,), int4) == 2 * 7168
    assert tensor_bytes("model.embed_tokens.weight", (1000, 256), fp8) == 2 * 1000 * 256
    assert tensor_bytes("lm_head.weight", (1000, 256), int4) == 1000 * 256 // 2 + 1000 * 4 * 4
    unquantized = WeightFormat("int4", quantize_embeddings=False)
    assert tensor_bytes("lm_head.weight", (1000, 256), unquantized) == 2 * 1000 * 256


def test_int4_is_about_0_5625_bytes_per_param_and_kv_is_mla():
    a = tiny_args(q_lora_rank=128)
    s = model_sizes(a, weight_format("int4", a))
    expert = s.layers[1].expert_bytes
    params = 3 * a.hidden_size * a.moe_intermediate_size
    assert expert == params // 2 + params // 64 * 4
    assert s.kv_bytes_per_token == (64 + 16) * 2
    assert s.hidden_bytes == 256 * 2


def test_tied_embeddings_and_no_mtp():
    tied = model_sizes(tiny_args(tie_word_embeddings=True), WeightFormat("bf16"))
    untied = model_sizes(tiny_args(), WeightFormat("bf16"))
    assert untied.head_bytes - tied.head_bytes == 2 * 1000 * 256
    assert tied.mtp_bytes == 0 and tied.mtp_layers == 0
    with_mtp = model_sizes(tiny_args(num_nextn_predict_layers=1), WeightFormat("bf16"))
    assert with_mtp.mtp_bytes > with_mtp.layers[1].held_bytes
    assert model_sizes(tiny_args(num_nextn_predict_layers=1), WeightFormat("bf16"), mtp=False).mtp_bytes == 0


@needs_real
def test_real_config_totals():
    a = load_args(REAL_CONFIG)
    bf16 = model_sizes(a, WeightFormat("bf16"), mtp=False)
    # layout.py counts 671.0B params for head + 61 blocks; bf16 is 2 bytes each, plus the f32 biases and the
    # 58 routers [256, 7168], held in f32
    assert (bf16.weight_bytes - 2 * 58 * 256 * 7168) / 2 / 1e9 == pytest.approx(671.0, abs=0.1)
    int4 = model_sizes(a, weight_format("int4", a), mtp=False)
    assert int4.weight_bytes / 1e9 == pytest.approx(671.0 * (0.5 + 4 / 64), rel=0.005)
    fp8 = model_sizes(a, weight_format("fp8", a), mtp=True)
    # 671B + ~14B MTP params ("685B" on the model card), ~1 byte each plus bf16 embeddings and f32 scales
    assert 680 < fp8.weight_bytes / 1e9 < 690
    # active per token ~37B params at 0.5625 bytes: int4 reads ~21 GB (kv_b_proj packed too, split per head)
    assert 20.5 < int4.read_bytes_per_token / 1e9 < 21.5
    assert math.isclose(int4.kv_bytes_per_token, (512 + 64) * 2)
