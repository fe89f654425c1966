"""Pins the MTP module's conventions (from vLLM's and SGLang's DeepSeek MTP code) with hand-built weights:
eh_proj sees [enorm(embedding of t), hnorm(h)] in that order; h is the main model's final hidden state
after the final norm; the embedding at position 0 is zeroed; shared_head.norm then shared_head.head."""

import pytest
import torch
from hf_reference import add_mtp_layer, build_checkpoint, make_config
from safetensors.torch import load_file, save_file

import moemesh
from moemesh.model.cache import Segment

D = 64


def rms(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """An MTP layer whose block is the identity (o_proj and every down_proj zero), unit norms, and
    eh_proj = [A | B] written per test."""
    path = tmp_path_factory.mktemp("mtp")
    config = make_config()
    build_checkpoint(path, config, seed=0)
    add_mtp_layer(path, config)
    tensors = load_file(path / "model.safetensors")
    n = config.num_hidden_layers
    for name in list(tensors):
        if name.startswith(f"model.layers.{n}.") and (name.endswith("o_proj.weight") or name.endswith("down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
        if name.startswith(f"model.layers.{n}.") and "norm" in name and "layernorm" not in name:
            tensors[name] = torch.ones_like(tensors[name])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path, config


def with_eh_proj(path, a: torch.Tensor, b: torch.Tensor):
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.cat([a, b], dim=1)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return moemesh.load(path, dtype="float32")


def test_eh_proj_takes_embedding_first(mtp_checkpoint):
    path, config = mtp_checkpoint
    engine = with_eh_proj(path, torch.eye(D), torch.zeros(D, D))  # only the embedding half passes
    model = engine.model
    ids, nxt = [4, 8, 15, 16], [8, 15, 16, 23]
    hidden, _ = model.head(model.forward(model.embed(ids), [Segment(engine.new_cache(), 0, 4)]))
    _, logits = model.mtp_logits(hidden, nxt, [Segment(engine.new_cache(), 0, 4)])
    head = load_file(path / "model.safetensors")["model.layers.3.shared_head.head.weight"]
    expected = rms(rms(model.embed_table[nxt])) @ head.T
    expected[0] = 0  # position 0: the embedding is zeroed, so everything after it is zero
    assert torch.allclose(logits, expected, atol=1e-5)
    # and the hidden-state half is ignored: other hidden states give the same logits
    _, other = model.mtp_logits(torch.randn_like(hidden), nxt, [Segment(engine.new_cache(), 0, 4)])
    assert torch.allclose(other, logits, atol=1e-5)


def test_eh_proj_takes_final_normed_hidden_second(mtp_checkpoint):
    path, config = mtp_checkpoint
    engine = with_eh_proj(path, torch.zeros(D, D), torch.eye(D))  # only the hidden-state half passes
    model = engine.model
    ids = [4, 8, 15, 16, 23]
    x = model.forward(model.embed(ids), [Segment(engine.new_cache(), 0, 5)])
    hidden, main_logits = model.head(x)
    norm_w = load_file(path / "model.safetensors")["model.norm.weight"]
    assert torch.allclose(hidden, norm_w * rms(x), atol=1e-6)  # head() hands over h after the final norm
    assert torch.allclose(main_logits, hidden @ load_file(path / "model.safetensors")["lm_head.weight"].T, atol=1e-5)
    _, logits = model.mtp_logits(hidden, [42] * 5, [Segment(engine.new_cache(), 0, 5)])
    head = load_file(path / "model.safetensors")["model.layers.3.shared_head.head.weight"]
    assert torch.allclose(logits, rms(rms(hidden)) @ head.T, atol=1e-5)


def test_no_mtp_layer_in_checkpoint(tmp_path):
    """transformers writes num_nextn_predict_layers without MTP weights: the model loads without MTP."""
    config = make_config(num_mtp_layers=1)
    build_checkpoint(tmp_path, config)
    engine = moemesh.load(tmp_path, dtype="float32")
    assert engine.model.mtp == []
    with pytest.raises(ValueError, match="has 0 MTP layer"):
        engine.model.mtp_logits(torch.zeros(1, D), [1], [Segment(engine.new_cache(), 0, 1)])
