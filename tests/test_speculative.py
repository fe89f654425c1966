"""Speculative decoding with the MTP module: accept/reject by hand, the sampled distribution is the model's
(chi-square), greedy output is unchanged token for token on one machine (float32, bf16) and on a 3-worker
cluster (pipeline, and pipeline + expert sharding, with a worker lost mid-generation), and a checkpoint whose
MTP drafts well gets its drafts accepted."""

import concurrent.futures as cf
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hf_reference import add_mtp_layer, build_checkpoint, make_config, make_mtp_predictive

import moemesh
from moemesh.demo import build_demo_checkpoint
from moemesh.launch import LocalCluster
from moemesh.model.generate import Request, Sampling, generate_tokens, probabilities, speculation, verify

PROMPTS = [[5, 9, 17], list(range(20, 31)), list(range(40, 47)) * 3, [99]]


def mtp_checkpoint(path, predictive: bool, **config):
    config = make_config(**config)
    build_checkpoint(path, config, seed=3)
    add_mtp_layer(path, config)
    if predictive:
        make_mtp_predictive(path, config)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))  # generate to the end
    return path


@pytest.fixture(scope="module")
def random_mtp(tmp_path_factory):
    return mtp_checkpoint(tmp_path_factory.mktemp("random_mtp"), predictive=False)


@pytest.fixture(scope="module")
def predictive_mtp(tmp_path_factory):
    return mtp_checkpoint(tmp_path_factory.mktemp("predictive_mtp"), predictive=True, num_hidden_layers=4,
                          max_position_embeddings=256)


def one_hot(i: int, n: int = 4) -> np.ndarray:
    return np.eye(n)[i]


def test_accept_and_reject_by_hand():
    rng = np.random.default_rng(0)
    greedy = Sampling()
    logits = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])  # argmax 1 at the draft, then 0
    assert verify([1], [one_hot(1)], logits, greedy, rng) == (1, 0)  # the argmax: kept, then the next argmax
    assert verify([3], [one_hot(3)], logits, greedy, rng) == (0, 1)  # not: replaced by the argmax
    assert verify([], [], logits[:1], greedy, rng) == (0, 1)  # no draft: plain sampling
    hot = Sampling(temperature=1.0)
    p = probabilities(logits[0], hot)
    for _ in range(50):  # a draft the model finds at least as likely as the draft model did is always kept
        assert verify([1], [p * 0.5 + one_hot(3) * 0.5], logits, hot, rng)[0] == 1
    top2 = Sampling(temperature=1.0, top_k=2)  # token 2 is outside the model's top 2: never kept, never drawn
    outcomes = {verify([2], [one_hot(2)], logits, top2, rng) for _ in range(200)}
    assert {kept for kept, _ in outcomes} == {0} and {token for _, token in outcomes} == {1, 3}
    q = np.array([0.05, 0.9, 0.02, 0.03])  # surer of 1 than the model is (p = [.03, .64, .09, .24])
    replaced = [token for kept, token in (verify([1], [q], logits, hot, rng) for _ in range(2000)) if not kept]
    assert abs(len(replaced) / 2000 - (1 - p[1] / q[1])) < 0.04  # rejected with probability 1 - p(1)/q(1)
    assert set(replaced) == {2, 3}  # and replaced from max(0, p - q): where the model puts more mass
    assert speculation("auto", True) and not speculation("auto", False) and not speculation(None, True)
    with pytest.raises(ValueError, match="needs MTP weights"):
        speculation("mtp", False)


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty; z is the normal quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_draws_from_the_model_distribution():
    """A toy model over 5 tokens whose logits depend on the last token, and a draft model that disagrees with it
    (about half its drafts are rejected): the first three tokens of many seeded runs are distributed as the
    model samples them, after temperature, top-k and top-p."""
    gen = np.random.default_rng(1)
    target, drafter = gen.normal(0, 1.5, (5, 5)), gen.normal(0, 1.5, (5, 5))
    s = Sampling(temperature=0.8, top_k=4, top_p=0.95)
    rng = np.random.default_rng(2)
    counts, runs, drafted, accepted = np.zeros((5, 5, 5)), 10000, 0, 0
    for _ in range(runs):
        req = Request([0], 3, s, speculative=True).start(5, 64)
        req.rng = rng

        def step(ids: list[int], start: int) -> np.ndarray:
            return target[ids[-1 - len(req.draft) :]]

        counts[tuple(generate_tokens(step, req, lambda r: r.propose(drafter[r.generated[-1]])))] += 1
        drafted, accepted = drafted + req.stats.drafted, accepted + req.stats.accepted
    p = np.array([probabilities(row, s) for row in target])
    expected = runs * p[0][:, None, None] * p[:, :, None] * p[None, :, :]
    cells = expected >= 5  # the chi-square approximation's rule; the rest is checked to be rare below
    chi2 = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    assert chi2 < chi_square_critical(int(cells.sum()) - 1), chi2
    assert counts[~cells].sum() <= 2 * expected[~cells].sum() + 10
    assert 0.3 < accepted / drafted < 0.8  # both branches taken often


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("predictive", [False, True], ids=["random_mtp", "predictive_mtp"])
def test_greedy_output_is_unchanged_on_one_machine(random_mtp, predictive_mtp, dtype, predictive):
    engine = moemesh.load(predictive_mtp if predictive else random_mtp, dtype=dtype)
    drafted = accepted = steps = new = 0
    for prompt in PROMPTS:
        plain = engine.generate(prompt, 40, speculative=None)
        assert engine.last_stats.drafted == 0 and engine.last_stats.steps == 40
        assert engine.generate(prompt, 40, speculative="mtp") == plain, f"prompt of {len(prompt)} tokens"
        s = engine.last_stats
        drafted, accepted, steps, new = drafted + s.drafted, accepted + s.accepted, steps + s.steps, new + s.new_tokens
    assert drafted == steps - len(PROMPTS)  # every step but the prompt's carried a draft
    if predictive:
        assert accepted > 0.3 * drafted and new > 1.3 * steps
    print(f"{'predictive' if predictive else 'random'} MTP, {dtype}: {accepted}/{drafted} drafts accepted, "
          f"{new / steps:.2f} tokens per step")


def test_sampling_with_speculation_is_seeded(predictive_mtp):
    engine = moemesh.load(predictive_mtp, dtype="float32")
    a = engine.generate(PROMPTS[1], 30, temperature=1.0, top_p=0.9, seed=7, speculative="mtp")
    assert engine.last_stats.accepted > 0
    assert a == engine.generate(PROMPTS[1], 30, temperature=1.0, top_p=0.9, seed=7, speculative="mtp")
    assert len(a) == 30 and all(0 <= t < engine.args.vocab_size for t in a)


def test_cli_speculative_flag(tmp_path):
    demo = build_demo_checkpoint(tmp_path / "demo")  # it has a tokenizer and an MTP layer
    result = subprocess.run([sys.executable, "-m", "moemesh.cli", "generate", "--model", str(demo), "-p", "Hello",
                             "-n", "8", "--speculative", "mtp"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "drafts accepted" in result.stderr and "tokens per step" in result.stderr


def test_mtp_asked_of_a_checkpoint_without_it(tmp_path):
    build_checkpoint(tmp_path, make_config())
    engine = moemesh.load(tmp_path, dtype="float32")
    assert engine.generate([1, 2], 3) == engine.generate([1, 2], 3, speculative=None)  # "auto": off here
    with pytest.raises(ValueError, match="needs MTP weights"):
        engine.generate([1, 2], 3, speculative="mtp")


@pytest.mark.parametrize("split", ["even", "even+experts"])
def test_cluster_greedy_output_is_unchanged(predictive_mtp, tmp_path, split):
    """Requests with and without drafts share each trip around a 3-worker ring; every output equals one
    machine's without speculation."""
    single = moemesh.load(predictive_mtp, dtype="float32")
    expected = [single.generate(p, 24, speculative=None) for p in PROMPTS]
    cluster = LocalCluster(predictive_mtp, 3, tmp_path, ["--split", split, "--dtype", "float32"])
    try:
        model = cluster.wait_ready(nodes=3)
        assert model.status().speculative  # the checkpoint has MTP weights: on by default
        choices = ["auto", None, "mtp", "off"]
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            outputs = list(pool.map(lambda p, c: model.generate(p, 24, speculative=c), PROMPTS, choices))
        assert outputs == expected
        assert model.generate(PROMPTS[1], 24) == expected[1]
        s = model.last_stats
        assert s.drafted == s.steps - 1 and s.accepted > 0 and s.tokens_per_step > 1
        assert model.generate(PROMPTS[1], 24, speculative="off") == expected[1] and model.last_stats.drafted == 0
        status = model.status()
        assert 0.3 < status.draft_acceptance < 1 and 1 < status.tokens_per_trip < 2
        print(f"{split}: one request {s.accepted}/{s.drafted} drafts accepted, {s.tokens_per_step:.2f} tokens per "
              f"trip; all requests {100 * status.draft_acceptance:.0f}% accepted, {status.tokens_per_trip:.2f} tokens "
              "per request per trip")
    finally:
        cluster.close()


def test_cluster_worker_lost_while_speculating(predictive_mtp, tmp_path):
    """The ring is re-planned and the request replays from position 0; drafting starts over and the output is
    unchanged."""
    single = moemesh.load(predictive_mtp, dtype="float32")
    cluster = LocalCluster(predictive_mtp, 3, tmp_path, ["--split", "even", "--dtype", "float32"])
    try:
        model = cluster.wait_ready(nodes=3)
        middle = json.loads(model.status().plan_json)["stages"][1]["lead"]
        got = []
        for token in model.stream(PROMPTS[1], max_new_tokens=120, speculative="mtp"):
            got.append(token)
            if len(got) == 5:
                cluster.kill(middle)
        assert got == single.generate(PROMPTS[1], 120, speculative=None)
        assert f"lost worker {middle}" in cluster.log("coordinator") and model.last_stats.accepted > 0
    finally:
        cluster.close()
