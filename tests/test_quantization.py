"""Compact weights: the MLX affine format against an independent numpy implementation, checkpoints quantized
by mlx-lm and by `moemesh quantize` on both backends (mlx-lm's logits are the referee for its own files),
bad scale tensors, the planner's byte accounting, and quantized logits against the unquantized model."""

import json
import shutil

import numpy as np
import pytest
import torch
from hf_reference import build_checkpoint, convert_to_fp8, make_config
from safetensors.torch import load_file, save_file

import moemesh
from moemesh.kernels.formats import dequantize, quantize
from moemesh.model.checkpoint import CheckpointError
from moemesh.spec.config import load_args
from moemesh.spec.sizes import checkpoint_format, model_sizes, weight_format
from moemesh.quantize import Recipe, convert

try:  # mlx and mlx-lm are optional (Linux: mlx[cpu])
    import mlx.core as mx
    from mlx_lm import convert as mlx_lm_convert
    from mlx_lm import load as mlx_lm_load
except ImportError:
    mx = None
needs_mlx = pytest.mark.skipif(mx is None, reason="mlx and mlx-lm are not installed")

# Dims divisible by 64, so mlx-lm quantizes every linear (it leaves the others unquantized).
DIMS = dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, kv_lora_rank=64, q_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, vocab_size=256)


# ---- the format, against numpy written from mlx's documentation
def numpy_quantize(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of `group` inputs: scale = (max - min) / (2^bits - 1), signed and adjusted so that the value of
    largest magnitude is exact; q = round((w - bias) / scale); values packed 32/bits per uint32, first lowest."""
    out, inp = w.shape
    levels = 2**bits - 1
    q = np.zeros((out, inp), np.uint32)
    scales = np.zeros((out, inp // group), np.float32)
    biases = np.zeros_like(scales)
    for r in range(out):
        for g in range(inp // group):
            v = w[r, g * group : (g + 1) * group].astype(np.float32)
            hi, lo = v.max(), v.min()
            step = np.float32(max((hi - lo) / np.float32(levels), np.float32(1e-7)))
            edge, step = (lo, step) if abs(lo) > abs(hi) else (hi, -step)
            q0 = np.rint(edge / step)
            if q0 != 0:
                step = np.float32(edge / q0)
            bias = np.float32(edge if q0 != 0 else 0.0)
            q[r, g * group : (g + 1) * group] = np.clip(np.rint((v - bias) / step), 0, levels)
            scales[r, g], biases[r, g] = step, bias
    per_word = 32 // bits
    packed = np.zeros((out, inp // per_word), np.uint32)
    for j in range(per_word):
        packed |= q[:, j::per_word] << np.uint32(bits * j)
    return packed, scales, biases


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_matches_numpy_and_round_trips(bits, group):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(bits + group)) * 0.05
    words, s = quantize(w, bits, group)
    packed, scales, biases = numpy_quantize(w.numpy(), bits, group)
    assert words.dtype == torch.uint32 and np.array_equal(words.numpy(), packed)
    assert np.array_equal(s.scales.numpy(), scales) and np.array_equal(s.biases.numpy(), biases)
    # dequantize: q * scale + bias, with q unpacked by numpy
    q = np.stack([(packed >> np.uint32(bits * j)) & np.uint32(2**bits - 1) for j in range(32 // bits)], -1)
    expected = q.reshape(24, 256).reshape(24, -1, group) * scales[..., None] + biases[..., None]
    back = dequantize(words, s)
    assert np.allclose(back.numpy(), expected.reshape(24, 256), rtol=0, atol=1e-7)
    step = torch.from_numpy(np.abs(scales)).repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= step + 1e-7).all()  # within a step (half a step, but at a group's clipped end)
    if mx is not None:  # and bit for bit what mlx writes
        mq, ms, mb = mx.quantize(mx.array(w.numpy()), group_size=group, bits=bits)
        assert np.array_equal(np.array(mq), packed) and np.array_equal(np.array(ms), scales)


# ---- checkpoints quantized by mlx-lm
def hf_checkpoint(path, **overrides):
    """A transformers checkpoint in the published config spelling (`rope_scaling`, top-level `rope_theta`),
    which mlx-lm reads, with the demo tokenizer (mlx-lm's convert wants one)."""
    from moemesh.demo import _tokenizer

    build_checkpoint(path, make_config(**(DIMS | overrides)))
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type")} | rope
    (path / "config.json").write_text(json.dumps(cfg))
    tok, tok_config = _tokenizer(1024)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def mlx_lm_dir(hf_dir, tmp_path_factory):
    if mx is None:
        pytest.skip("mlx-lm is not installed")
    dst = tmp_path_factory.mktemp("mlx") / "q4"
    mlx_lm_convert(str(hf_dir), str(dst), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    return dst


IDS = np.random.default_rng(0).integers(0, 256, (2, 14))


def mlx_lm_logits(path) -> np.ndarray:
    model, _ = mlx_lm_load(str(path))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


@needs_mlx
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_mlx_lm_quantized_checkpoint_matches_mlx_lm(mlx_lm_dir, backend):
    names = load_file(mlx_lm_dir / "model.safetensors").keys()
    assert any("switch_mlp" in n for n in names) and any("embed_q.weight" in n for n in names)  # mlx-lm's layout
    engine = moemesh.load(mlx_lm_dir, backend=backend, dtype="float32")
    assert np.abs(engine.logits(IDS.tolist()).numpy() - mlx_lm_logits(mlx_lm_dir)).max() <= 1e-4


@needs_mlx
def test_bf16_mlx_lm_checkpoint_within_bf16_noise(hf_dir, tmp_path):
    """The usual download: bf16 with bf16 scales and biases. In bf16 (our CPU kernels on torch) both backends
    stay as close to the float32 run of the same files as mlx-lm's own bf16 run does."""
    mlx_lm_convert(str(hf_dir), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    exact = moemesh.load(tmp_path / "q", dtype="float32").logits(IDS.tolist()).numpy()
    noise = np.abs(mlx_lm_logits(tmp_path / "q") - exact).mean()
    for backend in ("torch", "mlx"):
        engine = moemesh.load(tmp_path / "q", backend=backend, dtype="bfloat16")
        assert np.abs(engine.logits(IDS.tolist()).numpy() - exact).mean() <= 1.5 * noise, backend
        step = engine.step_fn(engine.new_cache())  # decode steps: the int4 kernel on torch
        decoded = [step(IDS[0, :6].tolist(), 0)] + [step([t], 6 + i) for i, t in enumerate(IDS[0, 6:].tolist())]
        assert np.abs(np.stack(decoded) - exact[0, 5:]).mean() <= 1.5 * noise, backend


@needs_mlx
@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("group", [64, 32])
def test_quantize_tool_output_matches_mlx_lm(hf_dir, tmp_path, backend, group):
    """Our quantizer's checkpoint (Hugging Face names, mixed 4/8 bits) loads in mlx-lm, with the same logits.
    kv_b_proj is split as mlx-lm splits it; with groups of 64 its key half (32 wide) stays dense, as mlx-lm's own."""
    convert(hf_dir, tmp_path / "q", Recipe(bits=4, group_size=group, keep=frozenset({"attn", "shared"})))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization_config"] == cfg["quantization"]
    assert cfg["quantization"]["model.layers.1.self_attn.o_proj"]["bits"] == 8
    assert cfg["quantization"]["model.layers.1.self_attn.unembed_out"]["bits"] == 8
    assert (cfg["quantization"].get("model.layers.1.self_attn.embed_q") is False) == (group == 64)
    engine = moemesh.load(tmp_path / "q", backend=backend, dtype="float32")
    assert np.abs(engine.logits(IDS.tolist()).numpy() - mlx_lm_logits(tmp_path / "q")).max() <= 1e-4


def test_quantize_tool_from_fp8_and_unquantized_parts(hf_dir, tmp_path):
    """FP8 source, int8, embeddings kept in bf16 (--keep-bits 16), several shards; the result's weights equal
    the quantizer applied to the dequantized FP8 weights."""
    reference = convert_to_fp8(hf_dir, tmp_path / "fp8")
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / extra, tmp_path / "fp8" / extra)
    convert(tmp_path / "fp8", tmp_path / "q", Recipe(bits=8, group_size=32, keep=frozenset({"embed"}), keep_bits=16),
            max_shard_bytes=200_000)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors |= load_file(tmp_path / "q" / file)
    name = "model.layers.1.mlp.experts.3.up_proj."
    words, s = quantize(reference[name + "weight"].bfloat16(), 8, 32)
    assert torch.equal(tensors[name + "weight"], words) and torch.equal(tensors[name + "scales"], s.scales)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # kept as the source had it
    attn = "model.layers.0.self_attn."  # kv_b_proj split per head as mlx-lm splits it, both halves packed
    heads, nope = json.loads((hf_dir / "config.json").read_text())["num_attention_heads"], DIMS["qk_nope_head_dim"]
    key_half = reference[attn + "kv_b_proj.weight"].bfloat16().view(heads, nope + DIMS["v_head_dim"], -1)[:, :nope]
    words, s = quantize(key_half.transpose(1, 2), 8, 32)
    assert attn + "kv_b_proj.weight" not in tensors and torch.equal(tensors[attn + "embed_q.weight"], words)
    assert torch.equal(tensors[attn + "embed_q.biases"], s.biases)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quant_method" not in cfg["quantization_config"] and cfg["quantization"]["model.embed_tokens"] is False
    engine = moemesh.load(tmp_path / "q", dtype="float32")
    assert engine.args.affine.bits == 8 and engine.generate([1, 2, 3], max_new_tokens=4)


def test_quantize_command(hf_dir, tmp_path):
    from typer.testing import CliRunner

    from moemesh.cli import app

    run = CliRunner().invoke(app, ["quantize", str(hf_dir), str(tmp_path / "q"), "--bits", "8", "--group-size", "32",
                                   "--keep", "attn"])
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 8
    bad = CliRunner().invoke(app, ["quantize", str(hf_dir), str(tmp_path / "r"), "--keep", "attn,tails"])
    assert bad.exit_code == 1 and "unknown part(s) tails" in bad.output


# ---- bad scale tensors name the tensor
@pytest.fixture(scope="module")
def q4_dir(hf_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("q4") / "q"
    convert(hf_dir, dst, Recipe(bits=4, group_size=64))
    return dst


def broken(q4_dir, tmp_path, edit_tensors=None, edit_config=None):
    dst = tmp_path / "broken"
    shutil.copytree(q4_dir, dst)
    file = dst / "model-00001-of-00001.safetensors"
    tensors = load_file(file)
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        index["weight_map"] = dict.fromkeys(tensors, file.name)
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


NAME = "model.layers.1.mlp.experts.2.gate_proj."  # [64, 128]: two groups of 64 per row


def test_corrupt_scales_name_the_tensor(q4_dir, tmp_path):
    def nan(t):
        t[NAME + "scales"][3, 0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"'{NAME}scales' holds non-finite"):
        moemesh.load(broken(q4_dir, tmp_path, nan))


def test_mismatched_scales_name_the_tensor(q4_dir, tmp_path):
    def halve(t):  # scales for groups of 128, but the weight and config say 64
        t[NAME + "scales"] = t[NAME + "scales"][:, :1].contiguous()
        t[NAME + "biases"] = t[NAME + "biases"][:, :1].contiguous()
    with pytest.raises(CheckpointError, match=rf"'{NAME}weight' and '{NAME}scales' hold 4-bit values in groups of 128"):
        moemesh.load(broken(q4_dir, tmp_path, halve))


def test_wrong_biases_and_missing_config_name_the_tensor(q4_dir, tmp_path):
    def drop_row(t):
        t[NAME + "biases"] = t[NAME + "biases"][1:].contiguous()
    with pytest.raises(CheckpointError, match=rf"'{NAME}biases' has shape \[63, 2\], expected \[64, 2\]"):
        moemesh.load(broken(q4_dir, tmp_path, drop_row))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.[a-z_.]+\.scales' is present but config"
                                              r"\.json has no 'quantization'"):
        moemesh.load(broken(q4_dir, tmp_path / "b", edit_config=lambda c: (c.pop("quantization"),
                                                                              c.pop("quantization_config"))))
    with pytest.raises(CheckpointError, match=r"quantization says 8-bit"):
        moemesh.load(broken(q4_dir, tmp_path / "c", edit_config=lambda c: c["quantization"].update(bits=8)))


# ---- memory: what the planner predicts, within 5%
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4"])
def test_weight_bytes_match_the_planner(hf_dir, tmp_path, fmt):
    path = hf_dir
    if fmt == "fp8":
        convert_to_fp8(hf_dir, path := tmp_path / "fp8")
    elif fmt != "bf16":
        convert(hf_dir, path := tmp_path / fmt, Recipe(bits=int(fmt[3:]), group_size=64))
    engine = moemesh.load(path, dtype="bfloat16")
    predicted = model_sizes(engine.args, weight_format(fmt, engine.args, group_size=64)).weight_bytes
    assert abs(engine.weight_bytes / predicted - 1) <= 0.05, (engine.weight_bytes, predicted)


@pytest.mark.parametrize("recipe", [Recipe(bits=4, group_size=64), Recipe(bits=4, group_size=32, keep=frozenset({"attn", "shared"}), keep_bits=8),
                                    Recipe(bits=8, group_size=64, keep=frozenset({"embed", "head"}), keep_bits=16)])
def test_live_planner_sizes_a_checkpoint_as_it_is_stored(hf_dir, tmp_path, recipe):
    # The coordinator plans with the checkpoint's own format (config.json's `quantization`, module by module),
    # not a bf16 guess: the prediction is what the loaded model holds.
    convert(hf_dir, tmp_path / "q", recipe)
    engine = moemesh.load(tmp_path / "q", dtype="bfloat16")
    fmt = checkpoint_format(engine.args, "bfloat16")
    assert fmt.name == f"int{recipe.bits}"
    predicted = model_sizes(engine.args, fmt).weight_bytes
    assert abs(engine.weight_bytes / predicted - 1) <= 0.02, (engine.weight_bytes, predicted)
    bf16 = model_sizes(load_args(hf_dir), checkpoint_format(load_args(hf_dir), "bfloat16")).weight_bytes
    assert predicted < 0.75 * bf16


# ---- the referee: quantized logits against the unquantized model
def agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || quantized) over all positions."""
    top1 = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
    p = reference.log_softmax(-1)
    kl = (p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean().item()
    return top1, kl


def test_quantized_logits_stay_close_to_the_reference(hf_dir, tmp_path):
    """300 positions. The KL bound carries the test: this random tiny model's logits are nearly flat (top-2
    margins of a few thousandths), so top-1 flips on near-ties that any rounding moves; bench/quant.py reports
    top-1 and KL for every format on a larger checkpoint."""
    ids = torch.randint(0, 256, (6, 50), generator=torch.Generator().manual_seed(5))
    reference = moemesh.load(hf_dir, dtype="float32").logits(ids)
    convert_to_fp8(hf_dir, tmp_path / "fp8")
    convert(hf_dir, tmp_path / "int8", Recipe(bits=8, group_size=64))
    convert(hf_dir, tmp_path / "int4", Recipe(bits=4, group_size=64))
    found = {path.name: agreement(reference, moemesh.load(path, dtype="float32").logits(ids))
             for path in (tmp_path / "fp8", tmp_path / "int8", tmp_path / "int4")}
    for name, max_kl, min_top1 in (("fp8", 1e-3, 0.85), ("int8", 1e-4, 0.95), ("int4", 1e-2, 0.5)):
        top1, kl = found[name]
        assert kl <= max_kl and top1 >= min_top1, found
    assert found["int8"][1] < found["fp8"][1] < found["int4"][1], found  # more bits, closer
