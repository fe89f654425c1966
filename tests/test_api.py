"""The OpenAI-compatible HTTP API, driven by the official `openai` client (and httpx where the client hides what
is checked) against real servers on 127.0.0.1: a coordinator with three workers (`coordinator start
--api-port`), and one machine (`moemesh serve`). Greedy answers equal the single-node engine's and `moemesh
generate`'s; many clients share the continuous batching; a stream closed half-way cancels its request and
frees its KV caches on every worker; every error has OpenAI's shape and status; /metrics speaks Prometheus."""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from procs import run_group

import moemesh
from moemesh.demo import DEMO_CONFIG, _tokenizer, write_random_checkpoint
from moemesh.launch import LocalCluster, free_port
from moemesh.model.generate import TextStream

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MAX_REQUESTS = 8  # the cluster's --api-max-requests: the 429 test fills it


def tiny_config() -> dict:
    """The demo checkpoint's layout (tokenizer, chat template) at a size that runs fast on two cores."""
    tok, _ = _tokenizer(DEMO_CONFIG["vocab_size"])
    return DEMO_CONFIG | {
        "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 48,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "max_position_embeddings": 256,
        "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = write_random_checkpoint(tmp_path_factory.mktemp("api") / "tiny-v3", tiny_config(), seed=1)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))  # generate to the end
    return path


@pytest.fixture(scope="module")
def single(checkpoint):
    return moemesh.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def cluster(checkpoint, tmp_path_factory):
    port = free_port()
    c = LocalCluster(checkpoint, 3, tmp_path_factory.mktemp("logs"),
                     ["--split", "even+experts", "--dtype", "float32", "--api-port", str(port),
                      "--api-max-requests", str(MAX_REQUESTS)])
    try:
        c.wait_ready(nodes=3).close()
        c.api = f"http://127.0.0.1:{port}"
        yield c
    finally:
        c.close()


def client(base: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def greedy_text(single, ids: list[int], n: int) -> str:
    """The single engine's greedy text, decoded as a stream is (an unfinished UTF-8 character at the end is
    not shown)."""
    text = TextStream(single.tokenizer.decode)
    for token in single.generate(ids, n):
        text.add(token)
    return text.text


def metrics(base: str) -> dict:
    """name -> [(labels, value)] of every sample."""
    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_chat_and_completions_stream_or_not_equal_the_single_engine(cluster, single, checkpoint):
    api, tok, name = client(cluster.api), single.tokenizer, checkpoint.name
    assert [m.id for m in api.models.list().data] == [name]

    prompt = "The quick brown fox"
    r = api.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy_text(single, tok.encode(prompt), 10)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), 10)

    ids = [5, 9, 17, 40]  # a prompt of token ids
    r = api.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy_text(single, ids, 6)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    want = greedy_text(single, tok.encode_chat(messages), 8)
    r = api.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want

    chunks = list(api.chat.completions.create(model=name, messages=messages, max_completion_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    chunks = list(api.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == greedy_text(single, tok.encode(prompt), 10)
    with httpx.stream("POST", cluster.api + "/v1/completions", timeout=60,
                      json={"model": name, "prompt": prompt, "max_tokens": 2, "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert [line for line in raw.iter_lines() if line][-1] == "data: [DONE]"


def test_greedy_api_answer_equals_moemesh_generate(cluster, checkpoint):
    prompt = "Hello, world! How are you"
    r = client(cluster.api).completions.create(model=checkpoint.name, prompt=prompt, max_tokens=12, temperature=0)
    cli = run_group([sys.executable, "-m", "moemesh.cli", "generate", "--model", str(checkpoint), "-p", prompt, "-n",
                     "12", "--dtype", "float32"], timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == prompt + r.choices[0].text + "\n"


def test_eight_concurrent_clients_share_the_batching(cluster, single, checkpoint):
    api, tok = client(cluster.api), single.tokenizer
    prompts = ["moemesh runs", "Each token is routed", "The attention keeps", "Hello", "I am fine, thank you.",
               "Mac minis, Linux boxes", "A coordinator finds the workers", "lazy dog"]

    def ask(i: int) -> str:
        if i % 2:  # half stream, half do not
            stream = api.completions.create(model=checkpoint.name, prompt=prompts[i], max_tokens=8, temperature=0,
                                            stream=True)
            return "".join(c.choices[0].text for c in stream)
        return api.completions.create(model=checkpoint.name, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    assert answers == [greedy_text(single, tok.encode(p), 8) for p in prompts]


def _nodes(base: str) -> list[dict]:
    return httpx.get(base + "/api/status", timeout=30).json()["nodes"]


def test_a_stream_closed_half_way_is_cancelled_and_its_caches_freed_on_every_worker(cluster, checkpoint):
    generated = lambda: metrics(cluster.api)["moemesh_generated_tokens_total"][0][1]  # noqa: E731
    before = generated()
    body = {"model": checkpoint.name, "prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", cluster.api + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        deadline = time.monotonic() + 60
        while not all(n["kv_bytes"] > 0 for n in _nodes(cluster.api)):  # heartbeats report each node's caches
            assert time.monotonic() < deadline, "the workers never reported the request's KV caches"
            next(lines)
            time.sleep(0.2)
    deadline = time.monotonic() + 30
    while True:  # the next heartbeat after the cancel shows every cache freed
        status = httpx.get(cluster.api + "/api/status", timeout=30).json()
        if status["active_requests"] == 0 and all(n["kv_bytes"] == 0 for n in status["nodes"]):
            break
        assert time.monotonic() < deadline, f"caches still held after the client left: {status['nodes']}"
        time.sleep(0.3)
    assert generated() - before < 200  # it stopped early


def test_errors_have_openai_shape_and_status(cluster, checkpoint):
    base, name = cluster.api, checkpoint.name
    api = client(base)

    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        return r.json()["error"]

    e = error(httpx.post(base + "/v1/completions", content=b"{not json", timeout=30), 400)
    assert "not valid JSON" in e["message"] and e["type"] == "invalid_request_error"
    for body, param in [({"prompt": "x"}, "model"), ({"model": name}, "prompt"),
                        ({"model": name, "prompt": "x", "temperature": 5}, "temperature"),
                        ({"model": name, "prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"model": name, "prompt": "x", "n": 3}, "n"),
                        ({"model": name, "prompt": "x", "logprobs": 2}, "logprobs"),
                        ({"model": name, "prompt": [10**6]}, "prompt"),  # outside the vocabulary
                        ({"model": name, "prompt": ["a", "b"]}, "prompt")]:
        e = error(httpx.post(base + "/v1/completions", json=body, timeout=30), 400)
        assert e["param"] == param, (body, e)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=name, messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as info:  # longer than the context (256)
        api.completions.create(model=name, prompt=list(range(3, 303)), max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as info:
        api.completions.create(model="gpt-4", prompt="hi")
    assert info.value.body["code"] == "model_not_found"
    assert error(httpx.get(base + "/v1/nothing-here", timeout=30), 404)["message"] == "no route GET /v1/nothing-here"
    assert error(httpx.get(base + "/v1/models/gpt-4", timeout=30), 404)["param"] == "model"

    # A full queue: MAX_REQUESTS streams held open, one more is refused with 429, then served once they end.
    body = {"model": name, "prompt": "hold", "max_tokens": 250, "stream": True}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", base + "/v1/completions", json=body) for _ in range(MAX_REQUESTS)]
        try:
            lines = [s.__enter__().iter_lines() for s in streams]  # kept: a line iterator dropped closes its stream
            for line in lines:
                next(line)  # each has started generating
            with pytest.raises(openai.RateLimitError) as info:
                api.completions.create(model=name, prompt="one more", max_tokens=1)
            assert info.value.body["code"] == "queue_full"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    deadline = time.monotonic() + 30
    while httpx.get(base + "/api/status", timeout=30).json()["api_in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert api.completions.create(model=name, prompt="one more", max_tokens=1).choices[0].finish_reason == "length"


def test_not_ready_is_503_and_a_key_guards_every_route_but_health(checkpoint, tmp_path):
    port = free_port()
    c = LocalCluster(checkpoint, 0, tmp_path, ["--expect", "2", "--dtype", "float32", "--api-port", str(port),
                                               "--ready-timeout", "1s"], env={"MOEMESH_API_KEY": "sekrit"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(base + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and c.procs["coordinator"].poll() is None, c.log("coordinator")
                time.sleep(0.2)
        assert health.status_code == 503 and "waiting for workers" in health.json()["waiting_for"]
        assert httpx.get(base + "/", timeout=5).status_code == 200  # the dashboard page holds no data
        for path in ("/v1/models", "/metrics", "/api/status"):
            r = httpx.get(base + path, timeout=5)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        api = client(base, "sekrit")
        assert api.models.list().data[0].id == checkpoint.name
        with pytest.raises(openai.InternalServerError) as info:  # 503
            api.completions.create(model=checkpoint.name, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.body["message"] == "not ready after 1 s: waiting for workers (0 of 2 expected joined)"
    finally:
        c.close()


def test_metrics_count_requests_tokens_nodes_and_experts(cluster, checkpoint):
    api = client(cluster.api)
    list(api.completions.create(model=checkpoint.name, prompt="metrics", max_tokens=4, temperature=0, stream=True))
    m = metrics(cluster.api)
    assert m["moemesh_ready"][0][1] == 1
    assert m["moemesh_generated_tokens_total"][0][1] > 0
    assert m["moemesh_api_time_to_first_token_seconds_count"][0][1] > 0
    assert m["moemesh_api_inter_token_latency_seconds_count"][0][1] > 0
    assert {labels["node"] for labels, _ in m["moemesh_node_compute_seconds"]} == {"w1", "w2", "w3"}
    assert all(v > 0 for _, v in m["moemesh_node_compute_seconds"] + m["moemesh_node_weight_bytes"])
    assert {labels["node"] for labels, _ in m["moemesh_node_kv_cache_bytes"]} == {"w1", "w2", "w3"}
    assert {labels["quantile"] for labels, _ in m["moemesh_link_seconds"]} == {"0.5", "0.99"}
    experts = m["moemesh_expert_tokens_total"]
    assert {labels["layer"] for labels, _ in experts} == {"1", "2", "3"} and len(experts) == 3 * 8
    assert sum(v for _, v in experts) > 0
    assert any(labels == {"route": "completions", "status": "200"} and v > 0
               for labels, v in m["moemesh_api_requests_total"])


def test_moemesh_serve_one_machine(checkpoint, single):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "serve", "--model", str(checkpoint), "--port",
                             str(port), "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        api, tok = client(base), single.tokenizer
        messages = [{"role": "user", "content": "Hello"}]
        with cf.ThreadPoolExecutor(2) as pool:  # two at once, batched on one machine
            answers = list(pool.map(lambda n: "".join(
                c.choices[0].delta.content or "" for c in api.chat.completions.create(
                    model=checkpoint.name, messages=messages, max_tokens=n, temperature=0, stream=True)), [6, 9]))
        assert answers == [greedy_text(single, tok.encode_chat(messages), n) for n in (6, 9)]
        status = httpx.get(base + "/api/status", timeout=30).json()
        assert [n["name"] for n in status["nodes"]] == ["local"] and status["heatmap"]["counts"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
