"""A coordinator and workers as real processes on 127.0.0.1: greedy output equals one machine's, token
for token, for pipeline-only and pipeline + expert-sharded placements, with concurrent requests; a
worker lost mid-generation is re-planned around; version skew is refused; weights can be streamed; a
request to a cluster that is not ready fails in time, saying what it waits for; hop latency holds
across machines whose clocks differ."""

import concurrent.futures as cf
import json
import threading
import time

import pytest
import torch
from moemesh.launch import LocalCluster
from hf_reference import build_checkpoint, make_config

import moemesh
from moemesh.coordinator.ring import StepTimes, link_s
from moemesh.quantize import Recipe, convert
from moemesh.transport import moemesh_pb2 as pb
from moemesh.transport.wire import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_checkpoint(path, make_config(num_hidden_layers=4, max_position_embeddings=256), seed=3)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))  # generate to the end
    return path


@pytest.fixture(scope="module")
def single(checkpoint):
    return moemesh.load(checkpoint, dtype="float32")


PROMPTS = [[5, 9, 17], list(range(20, 31)), list(range(40, 47)) * 3, [99]]


def check_against_single(model, single, max_new: int = 24):
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:  # 4 requests at once, of different lengths
        outputs = list(pool.map(lambda p: model.generate(p, max_new_tokens=max_new), PROMPTS))
    for prompt, out in zip(PROMPTS, outputs):
        assert out == single.generate(prompt, max_new_tokens=max_new), f"prompt of {len(prompt)} tokens"
    ids = torch.tensor([PROMPTS[1], list(range(60, 71))])
    assert torch.allclose(model.logits(ids), single.logits(ids), atol=1e-5)


@pytest.mark.parametrize("split", ["even", "even+experts"])
def test_three_workers_match_one_machine(checkpoint, single, tmp_path, split):
    cluster = LocalCluster(checkpoint, 3, tmp_path, ["--split", split, "--dtype", "float32"])
    try:
        model = cluster.wait_ready(nodes=3)
        status = model.status()
        plan = json.loads(status.plan_json)
        assert [(s["start"], s["end"]) for s in plan["stages"]] == [(0, 1), (1, 3), (3, 4)]
        assert sorted(s["lead"] for s in plan["stages"]) == ["w1", "w2", "w3"]
        if split == "even+experts":  # every MoE layer's experts live on more than one node
            for layer in plan["experts"]:
                assert len({node for reps in layer["replicas"] for node, _ in reps}) > 1
        check_against_single(model, single)
        stats = model.routing_stats()  # each lead counted its layers' tokens per expert
        assert sorted(stats.layers) == [1, 2, 3]
        assert len({sum(c) for c in stats.layers.values()}) == 1 and sum(stats.layers[1]) % 2 == 0
        status = model.status()
        assert {n.info.name for n in status.nodes} == {"w1", "w2", "w3"}
        assert 0 < status.hop_ms_median <= status.hop_ms_p99 < status.step_ms_median
        assert all(0 < n.busy_ms < status.step_ms_median for n in status.nodes)
        assert "joined from 127.0.0.1" in cluster.log("coordinator")
    finally:
        cluster.close()


def test_worker_lost_mid_generation_is_replanned_and_resumed(checkpoint, single, tmp_path):
    cluster = LocalCluster(checkpoint, 3, tmp_path, ["--split", "even", "--dtype", "float32"])
    try:
        model = cluster.wait_ready(nodes=3)
        prompt = PROMPTS[1]
        middle = json.loads(model.status().plan_json)["stages"][1]["lead"]
        got, killed = [], threading.Event()
        for token in model.stream(prompt, max_new_tokens=200):
            got.append(token)
            if len(got) == 5:
                cluster.kill(middle)  # the middle of the pipeline vanishes
                killed.set()
        assert killed.is_set()
        assert got == single.generate(prompt, max_new_tokens=200)
        log = cluster.log("coordinator")
        lost = middle
        assert f"lost worker {lost}" in log and "planning (" in log
        status = model.status()
        assert {n.info.name: n.state for n in status.nodes}[lost] == "lost"
        assert sorted(s["lead"] for s in json.loads(status.plan_json)["stages"]) == sorted({"w1", "w2", "w3"} - {lost})
    finally:
        cluster.close()


def test_version_skew_is_refused_with_both_versions(checkpoint, tmp_path):
    cluster = LocalCluster(checkpoint, 1, tmp_path, ["--dtype", "float32"])
    try:
        cluster.wait_ready(nodes=1)
        skewed = cluster.add_worker("old", ["--coordinator", cluster.target],
                                    env=cluster.env | {"MOEMESH_PROTOCOL_VERSION": "99"})
        assert skewed.wait(60) == 1
        for log in (cluster.log("old"), cluster.log("coordinator")):
            assert "protocol 99" in log and f"protocol {PROTOCOL_VERSION}" in log, log
    finally:
        cluster.close()


@pytest.mark.parametrize("fmt", ["float", "int4"])
def test_worker_without_the_files_gets_the_weights_streamed(checkpoint, single, tmp_path, fmt):
    """The shard's tensors stream from the coordinator, checked by sha256 — quantized shards as they are."""
    path = checkpoint
    if fmt == "int4":
        path = tmp_path / "int4"
        convert(checkpoint, path, Recipe(bits=4, group_size=32))
        single = moemesh.load(path, dtype="float32")
    cluster = LocalCluster(path, 2, tmp_path, ["--split", "even+experts", "--dtype", "float32"],
                           worker_args=["--fetch-weights"])
    try:
        model = cluster.wait_ready(nodes=2)
        assert model.generate(PROMPTS[0], max_new_tokens=12) == single.generate(PROMPTS[0], max_new_tokens=12)
    finally:
        cluster.close()


def test_workers_found_by_mdns_on_loopback(checkpoint, single, tmp_path):
    """No address given to the workers: they find the coordinator by mDNS (bound to 127.0.0.1)."""
    cluster = LocalCluster(checkpoint, 2, tmp_path, ["--split", "even", "--dtype", "float32"], mdns=True)
    try:
        model = cluster.wait_ready(nodes=2)
        assert model.generate(PROMPTS[2], max_new_tokens=8) == single.generate(PROMPTS[2], max_new_tokens=8)
        assert "looking for a coordinator" in cluster.log("w1")
    finally:
        cluster.close()


def test_request_to_a_cluster_not_ready_fails_in_time_saying_why(checkpoint, tmp_path):
    cluster = LocalCluster(checkpoint, 0, tmp_path, ["--expect", "2", "--dtype", "float32"])
    try:
        moemesh.connect(cluster.target, timeout=120).close()  # the coordinator is up (no worker will join)
        with moemesh.connect(cluster.target, timeout=2) as model:
            for call in (lambda: model.generate([1, 2, 3], max_new_tokens=2), lambda: model.logits([[1, 2, 3]])):
                t0 = time.monotonic()
                waiting = r"not ready after 2 s: waiting for workers \(0 of 2 expected joined\)"
                with pytest.raises(RuntimeError, match=waiting):
                    call()
                assert 2 <= time.monotonic() - t0 < 10
            with pytest.raises(ValueError, match="the prompt is empty"):  # a bad request needs no cluster
                model.generate([], max_new_tokens=2)
            status = model.status()
            assert status.state == "waiting" and status.waiting_for == "waiting for workers (0 of 2 expected joined)"
    finally:
        cluster.close()


def test_hop_latency_compares_no_two_clocks():
    """Each node reports only how long it held a step (its own clock); the links share the rest of the round trip
    timed on the coordinator. A node whose wall clock is hours off changes nothing: no wall clock is sent."""
    assert {f.name for f in pb.Hop.DESCRIPTOR.fields} == {"node_id", "busy_s"}
    assert link_s(0.010, [0.003, 0.002, 0.004]) == pytest.approx(0.00025)  # (10 - 9) ms over 4 hops
    assert link_s(0.004, [0.003, 0.002]) == 0.0  # timer noise never gives a negative link
    times = StepTimes()
    for step in range(100):
        busy = [0.003, 0.002 + step * 1e-5, 0.004]
        times.record(sum(busy) + 4 * 0.0005, [pb.Hop(node_id=f"w{i}", busy_s=b) for i, b in enumerate(busy)])
    assert times.hop_ms_median() == pytest.approx(0.5) and times.hop_ms_p99() == pytest.approx(0.5)
    assert times.busy_ms("w0") == pytest.approx(3.0) and times.busy_ms("w2") == pytest.approx(4.0)
    assert times.step_ms_median() == pytest.approx(11.5, abs=0.01) and times.busy_ms("elsewhere") == 0.0
