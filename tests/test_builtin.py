"""The built-in model shipped in the package: `moemesh.builtin_model()` finds it, its card states what it is, and
moemesh's greedy continuation of a Python prompt equals transformers' DeepseekV3ForCausalLM on the same files,
with and without MTP speculation."""

import json

import torch
from transformers import DeepseekV3ForCausalLM

import moemesh
from moemesh.spec.routing import RoutingStats

PROMPT = "def fibonacci(n):\n"


def test_builtin_model_is_complete():
    path = moemesh.builtin_model()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "routing.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    card = (path / "README.md").read_text()
    assert "held-out loss" in card and "MTP accuracy" in card
    stats = RoutingStats.load(path / "routing.json")
    assert stats.tokens > 0 and all(sum(row) > 0 for row in stats.layers.values())  # recorded, not zeros


def test_builtin_greedy_matches_transformers():
    path = moemesh.builtin_model()
    engine = moemesh.load(path, dtype="float32")
    ids = engine.tokenizer.encode(PROMPT)
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = []
    with torch.no_grad():  # greedy by hand: the referee's forward pass, not its generation settings
        for _ in range(24):
            want.append(int(hf(torch.tensor([ids + want])).logits[0, -1].argmax()))
            if want[-1] in engine.eos_ids:
                break
    assert engine.generate(ids, max_new_tokens=24, speculative="off") == want
    assert engine.generate(ids, max_new_tokens=24, speculative="mtp") == want
