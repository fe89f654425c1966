"""The cluster in the dtypes and formats people run, on the default placement (`--split auto`): bf16 and an
int4 checkpoint over three worker processes give, token for token, what one machine gives in the same dtype.
Each worker offers too little memory to hold the model alone, so the planner must split it."""

import json

import pytest
from hf_reference import build_checkpoint, make_config

import moemesh
from moemesh.launch import LocalCluster
from moemesh.quantize import Recipe, convert
from moemesh.spec.sizes import checkpoint_format, model_sizes

PROMPTS = [[5, 9, 17], list(range(20, 31)), list(range(40, 47)) * 3]
CONTEXT = 64  # tokens of KV cache the plan leaves room for: small, so the weights decide the split


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    build_checkpoint(path, make_config(num_hidden_layers=4, max_position_embeddings=256), seed=5)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))  # generate to the end
    return path


@pytest.fixture(scope="module")
def int4_checkpoint(bf16_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("int4")
    convert(bf16_checkpoint, path, Recipe(bits=4, group_size=32))
    return path


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_auto_split_matches_one_machine_in_the_same_dtype(bf16_checkpoint, int4_checkpoint, tmp_path, fmt):
    path = bf16_checkpoint if fmt == "bf16" else int4_checkpoint
    single = moemesh.load(path, dtype="bfloat16")
    expected = [single.generate(p, max_new_tokens=16) for p in PROMPTS]
    weights = model_sizes(single.args, checkpoint_format(single.args, "bfloat16")).weight_bytes
    offer = str(int(weights * 0.55))  # bytes: each worker holds about half the model at most
    cluster = LocalCluster(path, 3, tmp_path, ["--dtype", "bfloat16", "--context", str(CONTEXT)],
                           worker_args=["--memory", offer])
    try:
        model = cluster.wait_ready(nodes=None)
        plan = json.loads(model.status().plan_json)
        assert plan["strategy"] == "moemesh" and plan["quant"] == ("bf16" if fmt == "bf16" else "int4")
        assert len({node for s in plan["stages"] for node in [s["lead"], *s["helpers"]]}) >= 2, plan["stages"]
        # One request at a time: a step that batches several requests' tokens multiplies them together, and in
        # bf16 a multi-token matmul rounds differently from a one-token one (test_cluster.py holds concurrent
        # requests to one machine's tokens in float32).
        for prompt, want in zip(PROMPTS, expected):
            assert model.generate(prompt, max_new_tokens=16) == want, f"prompt of {len(prompt)} tokens"
    finally:
        cluster.close()
