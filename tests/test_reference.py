"""moemesh against transformers' DeepseekV3ForCausalLM on tiny random checkpoints of several shapes."""

import json
import shutil

import pytest
import torch
from hf_reference import SHAPES, add_mtp_layer, build_checkpoint, convert_to_fp8, make_config
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM

import moemesh
from moemesh.kernels.fp8 import Fp8Weight
from moemesh.model.cache import Segment


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    config = make_config(**SHAPES[request.param])
    reference = build_checkpoint(path, config)
    return path, config, reference


def test_full_forward_logits_match_fp32(checkpoint):
    path, _, reference = checkpoint
    ids = torch.randint(0, reference.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    got = moemesh.load(path, dtype="float32").logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_incremental_decode_equals_full_forward(checkpoint):
    path, config, _ = checkpoint
    engine = moemesh.load(path, dtype="float32")
    ids = torch.randint(0, config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))[0].tolist()
    full = engine.logits([ids])[0]
    cache = engine.new_cache()
    step = engine.step_fn(cache)
    chunks = [(0, 7), (7, 8), (8, 19), *[(t, t + 1) for t in range(19, 30)]]  # prefill, then steps of 1 and more
    for start, end in chunks:
        logits = torch.from_numpy(step(ids[start:end], start))
        assert (logits - full[end - 1]).abs().max().item() <= 1e-4, f"position {end - 1}"
    assert cache.length == 30


def test_greedy_generation_matches_fp32(checkpoint):
    path, config, reference = checkpoint
    prompt = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=24, do_sample=False)[0, 9:].tolist()
    got = moemesh.load(path, dtype="float32").generate(prompt[0].tolist(), max_new_tokens=24)
    assert got == expected


def test_bf16_matches_reference_within_its_own_precision(checkpoint):
    """In bf16, greedy tokens equal transformers' bf16 greedy tokens for 32 steps, except where bf16 cannot
    tell two tokens apart. Both runs round differently (we decode in the absorbed MLA form), so on random
    tiny models a near-tie can flip. The bound is the reference's own: a divergence is accepted only where
    the float32 reference scores the two tokens closer than twice the largest error transformers' bf16
    run makes on this checkpoint; and our bf16 logits are no further from float32 than its bf16 logits."""
    path, config, reference32 = checkpoint
    reference16 = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    engine = moemesh.load(path, dtype="bfloat16")
    gen = torch.Generator().manual_seed(3)
    exact, our_err, ref_err = 0, 0.0, 0.0
    for trial in range(4):
        prompt = torch.randint(0, config.vocab_size, (1, 6 + 3 * trial), generator=gen)
        with torch.no_grad():
            expected = reference16.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0]
            l32 = reference32(expected[None]).logits[0].float()
            l16 = reference16(expected[None]).logits[0].float()
        ours = engine.logits([expected.tolist()])[0]
        noise = (l16 - l32).abs().max().item()
        our_err, ref_err = our_err + (ours - l32).abs().mean().item(), ref_err + (l16 - l32).abs().mean().item()

        got = engine.generate(prompt[0].tolist(), max_new_tokens=32)
        expected = expected[prompt.shape[1]:].tolist()
        n = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if n is None:
            assert len(got) == 32 or got[-1] in engine.eos_ids
            exact += 1
            continue
        with torch.no_grad():
            truth = reference32(torch.tensor([prompt[0].tolist() + expected[:n]])).logits[0, -1]
        gap = abs(truth[got[n]] - truth[expected[n]]).item()
        assert gap <= 2 * noise, f"trial {trial} step {n}: chose {got[n]} over {expected[n]}, apart by {gap:.4f} > 2 x {noise:.4f}"
    assert our_err <= 1.5 * ref_err, f"bf16 error vs float32: ours {our_err / 4:.5f}, transformers' {ref_err / 4:.5f}"
    assert exact >= 1


# The official block, small odd blocks that split every matrix, and square blocks that BASE's MLA head dims
# fill (as 128 fills DeepSeek-V3's): there kv_b_proj stays FP8 too, its key half transposed block by block.
@pytest.mark.parametrize("shape, block", [("odd_dims_4groups", (128, 128)), ("odd_dims_4groups", (16, 8)), ("base", (4, 4))])
def test_fp8_checkpoint_matches_reference_on_dequantized_weights(tmp_path, shape, block):
    config = make_config(**SHAPES[shape])
    build_checkpoint(tmp_path / "bf", config, seed=5)
    fp8_dir = tmp_path / "fp8"
    dequantized = convert_to_fp8(tmp_path / "bf", fp8_dir, block)
    deq_dir = tmp_path / "deq"
    deq_dir.mkdir()
    save_file(dequantized, deq_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "bf" / "config.json", deq_dir)
    reference = DeepseekV3ForCausalLM.from_pretrained(deq_dir, dtype=torch.float32, experts_implementation="eager").eval()
    engine = moemesh.load(fp8_dir, dtype="float32")
    # FP8 weights stay FP8 in memory.
    blk = engine.model.blocks[1]
    assert blk.ffn.experts[0].gate.weight.dtype == torch.float8_e4m3fn
    assert blk.attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(blk.attn.w_uk, Fp8Weight) == (block == (4, 4))
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (engine.logits(ids) - expected).abs().max().item() <= 1e-4


def test_published_config_spelling(tmp_path):
    """rope_scaling with `type`, rope_theta at top level, no rope_interleave (interleaved) — as in the
    published DeepSeek-V3 repositories — loads the same model as the transformers-5 spelling."""
    config = make_config()
    reference = build_checkpoint(tmp_path, config, seed=7)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("rope_interleave")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (moemesh.load(tmp_path, dtype="float32").logits(ids) - expected).abs().max().item() <= 1e-4


def test_batched_requests_of_different_lengths_match_single_runs(tmp_path):
    """One step can carry several requests (continuous batching): each gets its own cache and positions."""
    config = make_config()
    build_checkpoint(tmp_path, config, seed=9)
    engine = moemesh.load(tmp_path, dtype="float32")
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    caches = [engine.new_cache() for _ in prompts]
    model = engine.model
    x = model.forward(model.embed([t for p in prompts for t in p]),
                      [Segment(c, 0, len(p)) for c, p in zip(caches, prompts)])
    _, logits = model.head(x)
    offsets = [0, 5, 16]
    for p, off in zip(prompts, offsets):
        single = engine.logits([p])[0]
        assert (logits[off : off + len(p)] - single).abs().max().item() <= 1e-5
    # then one decode step for all three at once, at different positions
    nxt = [3, 4, 5]
    x = model.forward(model.embed(nxt), [Segment(c, len(p), 1) for c, p in zip(caches, prompts)])
    _, logits = model.head(x)
    for i, (p, t) in enumerate(zip(prompts, nxt)):
        assert (logits[i] - engine.logits([p + [t]])[0, -1]).abs().max().item() <= 1e-5


def test_routing_counts(tmp_path):
    config = make_config()
    build_checkpoint(tmp_path, config, seed=11)
    engine = moemesh.load(tmp_path, dtype="float32")
    engine.logits(torch.randint(0, config.vocab_size, (2, 10)))
    stats = engine.routing_stats()
    moe_layers = [i for i in range(config.num_hidden_layers) if i >= config.first_k_dense_replace]
    assert sorted(stats.layers) == moe_layers
    for counts in stats.layers.values():
        assert len(counts) == config.n_routed_experts
        assert sum(counts) == 20 * config.num_experts_per_tok
    stats.save(tmp_path / "routing.json")
    assert type(stats).load(tmp_path / "routing.json") == stats


def test_mtp_layer_loads_and_has_its_own_cache(tmp_path):
    config = make_config()
    build_checkpoint(tmp_path, config, seed=12)
    add_mtp_layer(tmp_path, config)
    engine = moemesh.load(tmp_path, dtype="float32")
    assert len(engine.model.mtp) == 1
    ids = [5, 9, 17, 3, 22, 8]
    full = engine.logits([ids])
    main_cache, mtp_cache = engine.new_cache(), engine.new_cache()
    model = engine.model
    hidden, _ = model.head(model.forward(model.embed(ids), [Segment(main_cache, 0, 6)]))
    # MTP over positions 0..4 with the next tokens 1..5: whole, then the same split in two steps
    _, whole = model.mtp_logits(hidden[:5], ids[1:6], [Segment(mtp_cache, 0, 5)])
    split_cache = engine.new_cache()
    _, a = model.mtp_logits(hidden[:3], ids[1:4], [Segment(split_cache, 0, 3)])
    _, b = model.mtp_logits(hidden[3:5], ids[4:6], [Segment(split_cache, 3, 2)])
    assert torch.allclose(torch.cat([a, b]), whole, atol=1e-5)
    assert whole.shape == (5, config.vocab_size)
    assert not torch.allclose(whole, full[0, 1:6], atol=1e-3)  # the MTP head is its own model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_matches_reference(tmp_path):
    config = make_config(**SHAPES["odd_dims_4groups"])
    reference = build_checkpoint(tmp_path / "bf", config, seed=13)
    ids = torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        expected = reference(ids).logits
    engine = moemesh.load(tmp_path / "bf", dtype="float32", device="cuda")
    assert (engine.logits(ids) - expected).abs().max().item() <= 1e-4
    with torch.no_grad():
        greedy = reference.generate(ids[:1], max_new_tokens=16, do_sample=False)[0, 19:].tolist()
    assert engine.generate(ids[0].tolist(), max_new_tokens=16) == greedy
    fp8_dir = tmp_path / "fp8"
    convert_to_fp8(tmp_path / "bf", fp8_dir, (16, 8))
    fp8 = moemesh.load(fp8_dir, dtype="bfloat16", device="cuda")
    assert torch.isfinite(fp8.logits(ids)).all()
