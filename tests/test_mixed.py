"""Mixed backends in one cluster: workers computing with MLX and with torch (on this machine's CPU; CUDA where a
GPU exists) give one machine's greedy tokens — pipeline-only and expert-sharded, float32, bf16 (up to
near-ties), an int4 checkpoint, a worker lost mid-generation — and `coordinator status` names each node's backend
and device. In process: a shard serves the same hidden states on either backend (FP8 weights, batched requests,
rollback, experts for another node), and the choice of backend and device is checked."""

import json
import time

import pytest
import torch
from hf_reference import build_checkpoint, convert_to_fp8, make_config
from typer.testing import CliRunner

import moemesh
from moemesh.coordinator.cli import app as coordinator_app
from moemesh.kernels import get_backend
from moemesh.kernels.profile import decode_profile
from moemesh.launch import LocalCluster
from moemesh.model.checkpoint import Checkpoint
from moemesh.model.model import Transformer
from moemesh.quantize import Recipe, convert
from moemesh.spec.layout import mlp_shapes
from moemesh.spec.sizes import WeightFormat
from moemesh.worker.cli import app as worker_app
from moemesh.worker.device import choose
from moemesh.worker.shard import Shard

pytest.importorskip("mlx.core", reason="mlx is not installed (Linux: pip install 'mlx[cpu]')")

BACKENDS = ["mlx", "torch", "torch"]  # w1, w2, w3
PROMPTS = [[5, 9, 17], list(range(20, 31)), list(range(40, 47)) * 3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_checkpoint(path, make_config(num_hidden_layers=4, max_position_embeddings=256), seed=3)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))  # generate to the end
    return path


def mixed_cluster(path, tmp_path, coordinator_args, backends=BACKENDS, devices=None, worker_args=None) -> LocalCluster:
    """A coordinator and one worker per entry of `backends` (device cpu unless `devices` says), each with
    worker_args[i] if given."""
    cluster = LocalCluster(path, 0, tmp_path, [*coordinator_args, "--expect", str(len(backends))])
    for i, backend in enumerate(backends):
        extra = worker_args[i] if worker_args else []
        cluster.add_worker(f"w{i + 1}", ["--coordinator", cluster.target, "--backend", backend,
                                         "--device", devices[i] if devices else "cpu", *extra])
    return cluster


def close(cluster: LocalCluster, model) -> None:
    """The test's client first (no channel of this process left polling a coordinator going away), then the
    processes."""
    if model is not None:
        model.close()
    cluster.close()


def held_by_backend(model, name: str, near: int, timeout: float = 30.0) -> int:
    """The bytes node `name`'s backend reports holding, once a heartbeat has brought them and finished requests'
    caches are gone (they are freed by a step of their own, after the answers): the first report within 5% of
    `near`, else the last one."""
    deadline, held = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        held = next(n for n in model.status().nodes if n.info.name == name).held_bytes
        if held and abs(held / near - 1) <= 0.05:
            break
        time.sleep(0.2)
    return held


@pytest.mark.parametrize("split", ["even", "even+experts"])
def test_mixed_backends_match_one_machine(checkpoint, tmp_path, split):
    single = moemesh.load(checkpoint, dtype="float32")
    cluster = mixed_cluster(checkpoint, tmp_path, ["--split", split, "--dtype", "float32"])
    model = None
    try:
        model = cluster.wait_ready(nodes=3)
        plan = json.loads(model.status().plan_json)
        if split == "even":
            # The MLX node's memory as MLX counts it, before any request holds a cache: within 5% of what the
            # planner predicted its weights take.
            predicted = next(n for n in plan["nodes"] if n["name"] == "w1")
            assert predicted["backend"] == "mlx" and {n["backend"] for n in plan["nodes"]} == {"mlx", "cpu"}
            assert abs(held_by_backend(model, "w1", predicted["weight_bytes"]) / predicted["weight_bytes"] - 1) <= 0.05
        if split == "even+experts":  # every MoE layer's experts span backends
            for layer in plan["experts"]:
                assert len({node for reps in layer["replicas"] for node, _ in reps}) > 1
        outputs = [model.generate(p, max_new_tokens=20) for p in PROMPTS]
        assert outputs == [single.generate(p, max_new_tokens=20) for p in PROMPTS]
        ids = torch.tensor([PROMPTS[1], list(range(60, 71))])  # two requests in one step
        assert torch.allclose(model.logits(ids), single.logits(ids), atol=1e-5)
        if split == "even":
            shown = CliRunner().invoke(coordinator_app, ["status", "--coordinator", cluster.target])
            assert shown.exit_code == 0, shown.output
            rows = {line.split()[1]: line for line in shown.output.splitlines() if line.split()[1:2] in (["w1"], ["w2"], ["w3"])}
            assert "mlx/cpu" in rows["w1"] and "torch/cpu" in rows["w2"] and "torch/cpu" in rows["w3"], shown.output
        assert "(mlx on cpu)" in cluster.log("coordinator") and "serving with mlx on cpu" in cluster.log("w1")
    finally:
        close(cluster, model)


def test_mixed_backends_in_bf16_match_up_to_near_ties(checkpoint, tmp_path):
    """bf16: one machine's bf16 tokens, except where float32 itself scores the two tokens closer than twice the
    largest error bf16 makes on this checkpoint (the model core's bf16 rule, tests/test_reference.py)."""
    single16, single32 = moemesh.load(checkpoint, dtype="bfloat16"), moemesh.load(checkpoint, dtype="float32")
    cluster = mixed_cluster(checkpoint, tmp_path, ["--split", "even+experts", "--dtype", "bfloat16"])
    model = None
    try:
        model = cluster.wait_ready(nodes=3)
        exact = 0
        for prompt in PROMPTS:  # one request at a time: batching rounds bf16 differently (test_cluster_formats.py)
            got, want = model.generate(prompt, max_new_tokens=16), single16.generate(prompt, max_new_tokens=16)
            n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            if n is None:
                exact += 1
                continue
            ids = [prompt + want[:n]]
            noise = (single16.logits(ids)[0] - single32.logits(ids)[0]).abs().max().item()
            truth = single32.logits(ids)[0, -1]
            gap = abs(truth[got[n]] - truth[want[n]]).item()
            assert gap <= 2 * noise, f"step {n}: chose {got[n]} over {want[n]}, apart by {gap:.4f} > 2 x {noise:.4f}"
        assert exact >= 1
    finally:
        close(cluster, model)


def test_int4_mixed_cluster_replans_around_a_lost_worker(checkpoint, tmp_path):
    """An int4 checkpoint (the MLX worker streams its weights from the coordinator): a torch worker killed
    mid-generation is re-planned around, and the output is one machine's."""
    path = tmp_path / "int4"
    convert(checkpoint, path, Recipe(bits=4, group_size=32))
    single = moemesh.load(path, dtype="float32")
    cluster = mixed_cluster(path, tmp_path, ["--split", "even+experts", "--dtype", "float32"],
                            worker_args=[["--fetch-weights"], [], []])
    model = None
    try:
        model = cluster.wait_ready(nodes=3)
        got = []
        for token in model.stream(PROMPTS[1], max_new_tokens=60):
            got.append(token)
            if len(got) == 5:
                cluster.kill("w2")
        assert got == single.generate(PROMPTS[1], max_new_tokens=60)
        status = model.status()
        assert {n.info.name: n.state for n in status.nodes}["w2"] == "lost"
        assert sorted(s["lead"] for s in json.loads(status.plan_json)["stages"]) == ["w1", "w3"]
        assert "lost worker w2" in cluster.log("coordinator")
    finally:
        close(cluster, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_worker_beside_mlx_and_cpu_workers(checkpoint, tmp_path):
    single = moemesh.load(checkpoint, dtype="float32")
    cluster = mixed_cluster(checkpoint, tmp_path, ["--split", "even+experts", "--dtype", "float32"],
                            devices=["cpu", "cuda", "cpu"])
    model = None
    try:
        model = cluster.wait_ready(nodes=3)
        assert [model.generate(p, max_new_tokens=16) for p in PROMPTS] == \
               [single.generate(p, max_new_tokens=16) for p in PROMPTS]
        assert next(n for n in model.status().nodes if n.info.name == "w2").info.device == "cuda"
        assert held_by_backend(model, "w2", 1) > 0  # CUDA memory, as torch's allocator counts it
    finally:
        close(cluster, model)


# ---- in process

def _shards(path, layers, experts=None):
    ckpt = Checkpoint(path)
    return [Shard(Transformer.load(ckpt, get_backend(b, ckpt.args, dtype="float32"), layers=layers, head=False,
                                   experts=experts)) for b in ("torch", "mlx")]


def test_a_shard_serves_the_same_on_mlx_and_torch(checkpoint, tmp_path):
    """FP8 weights; two requests batched in one step, then one rolled back and re-run (speculation's rollback);
    and experts served for another node's lead: MLX gives torch's hidden states within float32 rounding."""
    convert_to_fp8(checkpoint, tmp_path / "fp8", (16, 8))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 64, generator=gen)
    results = []
    for shard in _shards(tmp_path / "fp8", [1, 2]):
        first = shard.step([("a", 0, 7), ("b", 0, 4)], x, [])
        again = shard.step([("a", 5, 2)], x[5:7], [])  # positions 5 and 6 once more: the cache is cut to 5 first
        assert shard.caches["a"].length == 7
        shard.cache("b").truncate(2)
        assert shard.caches["b"].length == 2 and shard.kv_bytes > 0
        rows = shard.serve_remote(2, x[:3], [0, 1, 2, 2], [1, 7, 0, 3], [0.5, 1.0, 0.25, 2.0])
        with pytest.raises(ValueError, match="held on this node"):
            shard.serve_remote(3, x[:1], [0], [0], [1.0])
        results.append((first, again, rows))
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4
    assert (results[0][1] - results[0][0][5:7]).abs().max().item() <= 1e-5


def test_expert_only_shard_on_mlx(checkpoint):
    torch_shard, mlx_shard = _shards(checkpoint, [], experts={1: [2, 5], 3: [0]})
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    for layer, expert in [(1, [5, 2, 5]), (3, [0, 0, 0])]:
        want = torch_shard.serve_remote(layer, x, [0, 1, 1], expert, [1.0, 0.5, 0.75])
        assert (mlx_shard.serve_remote(layer, x, [0, 1, 1], expert, [1.0, 0.5, 0.75]) - want).abs().max() <= 1e-5
    assert mlx_shard.backend.held_bytes() >= mlx_shard.model.weight_bytes > 0


@pytest.mark.parametrize("fmt,group", [("bf16", 64), ("int4", 64), ("fp8", 64)])
def test_mlx_profile_measures_its_own_decode_path(fmt, group):
    """Bytes and flops of one run on MLX, counted as the planner counts the format's bytes."""
    hidden, inter = 256, 128
    bytes_per_s, flops_per_s = decode_profile(hidden, inter, fmt, group, budget=1 << 20, repeats=1, backend="mlx")
    held = sum(WeightFormat(fmt, group_size=group).linear_bytes(s) for s in mlp_shapes(hidden, inter).values())
    assert bytes_per_s > 0 and flops_per_s / bytes_per_s == pytest.approx(6 * hidden * inter / held, rel=1e-9)


def test_backend_and_device_choice():
    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose("auto", "auto") in (("torch", cuda), ("mlx", "gpu"))  # MLX where this is Apple silicon
    assert choose("torch", "cpu") == ("torch", "cpu") and choose("mlx", "cpu") == ("mlx", "cpu")
    with pytest.raises(ValueError, match="not one of auto, torch, mlx"):
        choose("jax", "auto")
    with pytest.raises(ValueError, match="not one MLX runs on"):
        choose("mlx", "cuda")
    with pytest.raises(ValueError, match="not one torch knows"):
        choose("torch", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            choose("torch", "cuda:1")
    refused = CliRunner().invoke(worker_app, ["--backend", "mlx", "--device", "cuda", "--no-mdns",
                                              "--coordinator", "127.0.0.1:1"], env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and "not one MLX runs on" in refused.output
