"""Generation: sampling controls, EOS, stop strings, streaming text, chat template, bad requests."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from procs import run_group

import moemesh
from moemesh.demo import build_demo_checkpoint
from moemesh.model.generate import Request, Sampling, TextStream, check_prompt, generate_tokens, sample


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = build_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    return path, moemesh.load(path, dtype="float32")


def test_sampling_controls():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0])
    assert sample(logits, Sampling(), rng) == 1
    assert sample(logits, Sampling(temperature=1.0, top_k=1), rng) == 1
    assert sample(logits, Sampling(temperature=5.0, top_p=0.01), rng) == 1
    draws = [sample(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(300)]
    assert set(draws) == {1, 2}  # only the two best ever come out
    draws = [sample(logits, Sampling(temperature=1.0, top_p=0.6), rng) for _ in range(300)]
    assert set(draws) == {1, 2}  # p(1) ~ 0.43 alone is short of 0.6; with 2 it reaches 0.83
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_seeded_sampling_is_reproducible(demo):
    _, engine = demo
    prompt = engine.tokenizer.encode("The quick brown fox")
    a = engine.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=7)
    c = engine.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_generation_stops_at_eos_max_tokens_and_context():
    logits_by_step = [np.eye(5)[i] * 10 for i in (2, 3, 4, 1, 2)]

    def step(ids, start):  # the prefill (start 0) picks 2, then 3, 4, 1, 2
        return logits_by_step[0 if start == 0 else start - 2]

    req = Request([0, 0, 0], max_new_tokens=10, eos_ids=(4,)).start(5, 100)
    assert list(generate_tokens(step, req)) == [2, 3, 4]  # EOS included, then stop
    assert req.stats.finish_reason == "stop" and req.stats.new_tokens == 3
    req = Request([0, 0, 0], max_new_tokens=2, eos_ids=(4,)).start(5, 100)
    assert list(generate_tokens(step, req)) == [2, 3] and req.stats.finish_reason == "length"
    req = Request([0, 0, 0], max_new_tokens=10).start(5, 6)
    assert len(list(generate_tokens(step, req))) == 3  # context of 6 positions: 3 new tokens fit
    assert req.fed == 5 and req.stats.finish_reason == "length"  # the last token is never fed


def test_request_keeps_tokens_up_to_the_one_that_ends_it():
    """Several tokens accepted in one step (as speculative decoding does) stop where one token at a time would."""
    def decode(ids: list[int]) -> str:
        return "".join(" abcd"[i] for i in ids)

    req = Request([1], max_new_tokens=10, eos_ids=(4,), stop=["bc"]).start(5, 100, decode)
    assert req.add([1], now=req.submitted + 0.5) == [1] and not req.finished
    assert req.add([2, 3, 1, 4], now=req.submitted + 2.5) == [2, 3] and req.stats.finish_reason == "stop"
    assert req.add([1], now=req.submitted + 3.0) == [] and req.generated == [1, 2, 3]
    s = req.stats  # prefill: submission to the first token; decode: first token to the last
    assert (s.prompt_tokens, s.new_tokens, s.prefill_s, s.decode_s) == (1, 3, pytest.approx(0.5), pytest.approx(2.0))
    assert s.decode_tokens_per_s == pytest.approx(1.0) and s.prefill_tokens_per_s == pytest.approx(2.0)
    req = Request([1, 2], max_new_tokens=3, eos_ids=(4,)).start(5, 100)
    assert req.add([1, 1, 1, 1]) == [1, 1, 1] and req.stats.finish_reason == "length"
    req = Request([1, 2], max_new_tokens=9).start(5, 4)
    assert req.add([1, 1, 1]) == [1, 1] and req.stats.finish_reason == "length"  # the context holds 4


def test_prompt_checks_say_what_is_wrong():
    for prompt, stop, tokenizer, message in [
            ([], None, True, "the prompt is empty"),
            ([1] * 8, None, True, "the prompt has 8 tokens; this model's context is 8 positions"),
            ([1, 9], None, True, r"token id 9 is outside the vocabulary \(0..8\)"),
            ([1], ["x"], False, "stop strings need a tokenizer")]:
        with pytest.raises(ValueError, match=message):
            check_prompt(prompt, 9, 8, stop, tokenizer)
    check_prompt([8] * 7, 9, 8, ["x"], True)


def test_text_stream_holds_back_possible_stop_strings():
    vocab = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!"}
    stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), stop=["world"])
    deltas = [stream.add(t) for t in (1, 2, 3)]
    assert "".join(deltas) == "Hello "  # "wor" may begin "world": held back
    assert stream.add(4) == "" and stream.stopped
    assert stream.text == "Hello " and stream.flush() == ""
    stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), stop=["wx"])
    assert "".join(stream.add(t) for t in (1, 2, 3, 4, 5)) + stream.flush() == "Hello world!"


def test_stop_strings_end_generation(demo):
    _, engine = demo
    prompt = engine.tokenizer.encode("Hello")
    free = engine.generate(prompt, 30, temperature=1.0, seed=3)
    text = engine.tokenizer.decode(free)
    stop = re.search("[a-z]{2}", text[len(text) // 3 :]).group()  # plain letters: no partial UTF-8 around
    stopped = engine.generate(prompt, 30, temperature=1.0, seed=3, stop=[stop])
    assert stopped == free[: len(stopped)] and len(stopped) < len(free)
    assert stop in engine.tokenizer.decode(stopped) and stop not in engine.tokenizer.decode(stopped[:-1])
    assert engine.last_stats.finish_reason == "stop"


def test_bad_requests_fail_clearly(demo):
    _, engine = demo
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([], 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, engine.args.vocab_size], 5)
    with pytest.raises(ValueError, match="this model's context is 4096"):
        engine.generate([5] * 5000, 5)
    with pytest.raises(ValueError, match="equal-length"):
        engine.logits([[1, 2], [3]])


def test_chat_template(demo):
    _, engine = demo
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_cli_generate_streams_and_reports(demo, tmp_path):
    path, _ = demo
    routing = tmp_path / "routing.json"
    result = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "generate", "--model", str(path), "--prompt", "Hello", "-n", "8",
         "--save-routing", str(routing)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")
    assert "decode" in result.stderr and "tok/s" in result.stderr and "B/token/layer" in result.stderr
    assert "288 B/token/layer" in result.stderr  # (128 latent + 16 rope) x 2 bytes in bf16
    assert json.loads(routing.read_text())["format"] == "moemesh.routing/1"


def test_cli_reports_bad_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = subprocess.run([sys.executable, "-m", "moemesh.cli", "generate", "--model", str(tmp_path), "-p", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "model_type 'llama' is not supported" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_demo(tmp_path):
    # A fresh user's environment, with the installation's scripts on PATH (where `moemesh` itself is found): a ninja
    # other than the one that built the CPU kernels would build them all again.
    env = {"MOEMESH_CACHE": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = run_group([sys.executable, "-m", "moemesh.cli", "demo", "-n", "6"], timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert "the built-in model" in result.stderr and "decode" in result.stderr
    assert "\ndef fibonacci(n):\n" in result.stdout  # the plan first, then the completion of the prompt
