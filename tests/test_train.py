"""`moemesh train-demo`'s trainer on a tiny config and a slice of the standard library: the loss falls, the
routing bias moves expert load toward balance, and the written checkpoint loads in moemesh with the logits of
transformers' DeepseekV3ForCausalLM on the same files (the MTP logits: those of the training module)."""

import json

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

import moemesh
from moemesh.model.cache import Segment
from moemesh.spec.config import args_from_dict
from moemesh.spec.routing import RoutingStats
from moemesh.train import data
from moemesh.train.export import write_checkpoint
from moemesh.train.model import DeepseekV3, Moe
from moemesh.train.run import TRAIN_CONFIG, Settings, train

TINY = TRAIN_CONFIG | dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=2,
                           topk_group=1, num_experts_per_tok=2)
STEPS = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained STEPS steps on 12 files; returns (checkpoint dir, per-step losses, evaluation)."""
    out = tmp_path_factory.mktemp("tiny_trained")
    losses: list[float] = []
    settings = Settings(minutes=10, max_steps=STEPS, batch=4, seq_len=48, lr=1e-2, warmup_steps=4, eval_windows=4,
                        max_files=12, tokenizer_bytes=200_000, config=TINY)
    result = train(out, settings, lambda step, loss, tps, done: losses.append(loss), log=lambda _: None)
    return out, losses, result


def test_loss_falls(trained):
    _, losses, result = trained
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, losses
    assert result.loss < first


def test_checkpoint_matches_transformers(trained):
    path, _, _ = trained
    ids = [0, *range(40, 70)]
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    engine = moemesh.load(path, dtype="float32")
    got = engine.logits([ids])[0]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)

    # MTP: transformers has none, so the referee is the training module on the same (bf16-rounded) weights.
    module = DeepseekV3(engine.args)
    module.load_state_dict(checkpoint_tensors_from(path))
    with torch.no_grad():
        main, mtp = module(torch.tensor([ids]))
    torch.testing.assert_close(main[0], expected, atol=2e-4, rtol=1e-4)
    m = engine.model
    hidden = m.final_norm(m.forward(m.embed(ids), [Segment(engine.new_cache(), 0, len(ids))]))
    _, mtp_logits = m.mtp_logits(hidden[:-1], ids[1:], [Segment(engine.new_cache(), 0, len(ids) - 1)])
    torch.testing.assert_close(mtp_logits, mtp[0], atol=2e-4, rtol=1e-4)


def checkpoint_tensors_from(path):
    from safetensors.torch import load_file

    return {name: t.float() for name, t in load_file(path / "model.safetensors").items()}


def test_written_files(trained):
    path, _, result = trained
    card = (path / "README.md").read_text()
    assert f"{STEPS} steps" in card and f"{result.loss:.3f}" in card
    stats = RoutingStats.load(path / "routing.json")
    k, windows = TINY["num_experts_per_tok"], stats.tokens // 48
    # the MoE layer routes every held-out position; the MTP layer (2) all but the last of each window
    assert {layer: sum(row) for layer, row in stats.layers.items()} == {1: windows * 48 * k, 2: windows * 47 * k}
    tok = moemesh.load(path).tokenizer
    assert tok.decode(tok.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == tok.bos_id == 0


def test_fp8_export_loads_with_close_logits(trained, tmp_path):
    path, _, _ = trained
    bf16 = moemesh.load(path, dtype="float32")
    module = DeepseekV3(bf16.args)
    module.load_state_dict(checkpoint_tensors_from(path))
    write_checkpoint(module, json.loads((path / "config.json").read_text()), tmp_path, "fp8")
    fp8 = moemesh.load(tmp_path, dtype="float32")
    assert fp8.args.fp8_block == (128, 128)
    ids = [0, *range(40, 70)]
    expected, got = bf16.logits([ids])[0], fp8.logits([ids])[0]
    assert not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, atol=0.1 * expected.abs().max().item(), rtol=0)


def test_bias_update_moves_load_toward_balance():
    a = args_from_dict(TINY)
    torch.manual_seed(0)
    moe = Moe(a)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.e_score_correction_bias[0] = 0.5  # expert 0 (and its group) picked by most tokens
    x = torch.randn(512, a.hidden_size)

    def imbalance() -> float:
        moe(x)
        return (moe.load.max() / moe.load.float().mean()).item()

    before = imbalance()
    for _ in range(60):
        moe(x)
        moe.balance(0.01)
    after = imbalance()
    assert before > 2 and after < before * 0.6, (before, after)
    assert moe.gate.e_score_correction_bias[0] < 0.5  # the favoured expert's bias went down


def test_corpus_split_is_by_file_and_fixed():
    first, again = data.split_corpus(seed=0, max_files=40), data.split_corpus(seed=0, max_files=40)
    assert first.train == again.train and first.held_out == again.held_out
    assert not set(first.train) & set(first.held_out) and len(first.held_out) == 2
    assert data.split_corpus(seed=1, max_files=40).held_out != first.held_out
    assert all("site-packages" not in p.parts for p in first.train)
