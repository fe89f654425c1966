"""Loading: config spellings and sizes, selective loading, and clear errors for bad checkpoints."""

import json
import shutil

import pytest
import torch
from hf_reference import build_checkpoint, convert_to_fp8, make_config
from safetensors.torch import load_file, save_file

import moemesh
from moemesh.model.checkpoint import Checkpoint, CheckpointError
from moemesh.spec.config import ConfigError, args_from_dict, load_args
from moemesh.spec.layout import block_shapes, head_shapes
from moemesh.model.model import Transformer
from moemesh.kernels import get_backend
from test_placement_support import REAL_CONFIG


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    build_checkpoint(path, make_config(num_hidden_layers=4), seed=0)
    return path


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_real_671b_config_sizes():
    a = load_args(REAL_CONFIG)
    assert a.rope_interleave and a.rope_scaling.factor == 40 and a.rope_theta == 10000
    assert a.fp8_block == (128, 128) and a.mtp_layers == range(61, 62)
    assert a.kv_cache_bytes_per_token(2) == (512 + 64) * 2
    assert [a.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    params = sum(torch.Size(s).numel() for s in head_shapes(a).values())
    params += sum(torch.Size(s).numel() for layer in range(61) for s in block_shapes(a, layer).values())
    assert round(params / 1e9, 1) == 671.0  # the published total, embeddings and head included
    # softmax scale with YaRN mscale: (0.1 ln 40 + 1)^2 / sqrt(192)
    assert a.softmax_scale == pytest.approx((0.1 * 3.6888794541139363 + 1) ** 2 / 192**0.5)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"n_group": 3}, "n_group"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "rope type 'llama3'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq'"),
    ({"vocab_size": None}, "'vocab_size' is missing"),
])
def test_unsupported_configs_are_refused_by_name(good, tmp_path, change, message):
    path = copy(good, tmp_path / "ckpt")
    edit_config(path, **change)
    with pytest.raises(CheckpointError, match=message):
        moemesh.load(path)


def test_missing_tensor_is_named(good, tmp_path):
    path = copy(good, tmp_path / "ckpt")
    edit_tensors(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        moemesh.load(path)


def test_wrong_shape_is_named(good, tmp_path):
    path = copy(good, tmp_path / "ckpt")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    edit_tensors(path, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[175, 32\], expected \[176, 32\]"):
        moemesh.load(path)


def test_truncated_safetensors_file(good, tmp_path):
    path = copy(good, tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file .*truncated"):
        moemesh.load(path)


def test_missing_files(tmp_path, good):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        moemesh.load(tmp_path / "nowhere")
    path = copy(good, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        moemesh.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        moemesh.load(path)


def test_wrong_dtype_is_named(good, tmp_path):
    path = copy(good, tmp_path / "ckpt")
    name = "model.layers.0.input_layernorm.weight"
    edit_tensors(path, lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    with pytest.raises(CheckpointError, match=f"'{name}' has dtype torch.int32"):
        moemesh.load(path)


def test_fp8_scale_problems_are_named(good, tmp_path):
    fp8 = tmp_path / "fp8"
    convert_to_fp8(good, fp8, (16, 16))
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    broken = copy(fp8, tmp_path / "missing_scale")
    edit_tensors(broken, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"has no block scales '{name}'"):
        moemesh.load(broken)
    broken = copy(fp8, tmp_path / "bad_scale")
    edit_tensors(broken, lambda t: t.__setitem__(name, t[name][:, :-1].clone()))
    with pytest.raises(CheckpointError, match=f"'{name}' has shape"):
        moemesh.load(broken)
    broken = copy(fp8, tmp_path / "nan_scale")
    edit_tensors(broken, lambda t: t[name].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=f"'{name}' holds non-finite"):
        moemesh.load(broken)
    broken = copy(fp8, tmp_path / "no_quant_config")
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["quantization_config"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="float8_e4m3fn but config.json has no quantization_config"):
        moemesh.load(broken)


def test_a_node_reads_only_its_layers(good, tmp_path):
    """Shard the checkpoint one layer per file, delete the files of layers 0 and 3: a node holding
    layers 1-2 (no head) still loads, and matches the full model's layers 1-2."""
    tensors = load_file(good / "model.safetensors")
    path = tmp_path / "sharded"
    path.mkdir()
    shutil.copy(good / "config.json", path)

    def shard_of(name: str) -> str:
        return f"layer{name.split('.')[2]}.safetensors" if name.startswith("model.layers.") else "head.safetensors"

    weight_map = {n: shard_of(n) for n in tensors}
    for file in set(weight_map.values()):
        save_file({n: t for n, t in tensors.items() if weight_map[n] == file}, path / file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    full = moemesh.load(path, dtype="float32").model
    (path / "layer0.safetensors").unlink()
    (path / "layer3.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard 'layer0.safetensors', which is missing"):
        Checkpoint(path)
    weight_map = {n: f for n, f in weight_map.items() if f not in ("layer0.safetensors", "layer3.safetensors")}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = Checkpoint(path)
    part = Transformer.load(ckpt, get_backend("torch", ckpt.args, "float32"), layers=[1, 2], head=False)
    assert part.layers == [1, 2] and part.embed_table is None
    from moemesh.model.cache import Segment

    x = torch.randn(5, 64)
    a = full.forward(x, [Segment(_cache(full), 0, 5)], layers=[1, 2])
    b = part.forward(x, [Segment(_cache(part), 0, 5)])
    assert torch.equal(a, b)


def test_expert_subset_loads_only_those_experts(good):
    ckpt = Checkpoint(good)
    part = Transformer.load(ckpt, get_backend("torch", ckpt.args, "float32"), layers=[2], head=False,
                            experts={2: [1, 6]})
    assert sorted(part.blocks[2].ffn.experts) == [1, 6]
    with pytest.raises(ValueError, match="expert 8 does not exist"):
        Transformer.load(ckpt, get_backend("torch", ckpt.args, "float32"), layers=[2], head=False, experts={2: [8]})


def _cache(model):
    from moemesh.model.cache import KVCache

    return KVCache(model.backend, model.args.kv_cache_width)


def test_config_spellings_parse_alike():
    published = {"model_type": "deepseek_v3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                 "num_hidden_layers": 1, "num_attention_heads": 1, "kv_lora_rank": 4, "q_lora_rank": None,
                 "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2, "rope_theta": 500.0,
                 "max_position_embeddings": 64,
                 "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16}}
    hf5 = {k: v for k, v in published.items() if k not in ("rope_theta", "rope_scaling")}
    hf5 |= {"rope_interleave": True, "rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4,
                                                         "original_max_position_embeddings": 16}}
    assert args_from_dict(published) == args_from_dict(hf5)
    plain = args_from_dict(published | {"rope_scaling": None})
    assert plain.rope_scaling is None and plain.rope_theta == 500.0
