"""Hand-checkable plans on a tiny model, errors that name the short node, JSON, re-planning."""

import pytest

from moemesh.placement import PlacementError, Plan, plan
from moemesh.placement.cost import TimeModel
from moemesh.spec.sizes import WeightFormat, model_sizes
from test_placement_support import cluster, node, tiny_args

CONTEXT = 64


def budgets(args):
    """(bytes of one whole layer on its lead, bytes the head always holds) for bf16 weights."""
    tm = TimeModel.build(args, model_sizes(args, WeightFormat("bf16")), CONTEXT)
    s = tm.sizes.layers[-1]
    return tm.lead_memory(len(tm.sizes.layers) - 1) + s.n_experts * s.expert_bytes, tm.head_memory(), tm


def run(args, c, **kw):
    return plan(args, c, context=CONTEXT, quant="bf16", **kw)


def covered(p: Plan, n_layers: int) -> list[int]:
    return [l for s in p.stages for l in range(s.start, s.end)]


def test_two_equal_nodes_split_evenly_and_small_nodes_get_nothing():
    args = tiny_args(first_k_dense_replace=0)  # 8 identical MoE layers
    layer, head, _ = budgets(args)
    c = cluster(node("coord", head + layer // 2, head=True), node("a", 5 * layer), node("b", 5 * layer),
                node("tiny", layer // 2))
    p = run(args, c, max_group=1)
    assert sorted(p.layers_of("a") + p.layers_of("b")) == [(0, 4), (4, 8)]
    assert p.layers_of("coord") == [] and p.node("coord").role == "head"
    assert p.node("tiny").role == "unused" and p.node("tiny").memory_used == 0


def test_faster_node_takes_all_the_layers_its_memory_holds():
    args = tiny_args(first_k_dense_replace=0)
    layer, head, _ = budgets(args)
    c = cluster(node("fast", head + 5 * layer, bandwidth=200e9, head=True), node("slow", 8 * layer, bandwidth=100e9))
    p = run(args, c, max_group=1)
    assert p.layers_of("fast") == [(0, 5)] and p.layers_of("slow") == [(5, 8)]


def test_a_slow_node_is_left_out_when_the_fast_one_holds_everything():
    args = tiny_args()
    layer, head, _ = budgets(args)
    c = cluster(node("fast", head + 9 * layer, bandwidth=200e9, head=True), node("slow", 9 * layer, bandwidth=10e9))
    p = run(args, c)
    assert p.layers_of("fast") == [(0, 8)] and p.node("slow").role == "unused"


def test_cannot_fit_names_the_node_and_the_bytes():
    args = tiny_args()
    _, _, tm = budgets(args)
    need = tm.head_memory() + sum(tm.lead_memory(l) + s.n_experts * s.expert_bytes for l, s in enumerate(tm.sizes.layers))
    with pytest.raises(PlacementError) as e:
        run(args, cluster(node("solo", need - 12345)))
    assert "solo" in str(e.value) and "short by 12345 bytes" in str(e.value)
    assert e.value.shortfalls == {"solo": 12345}
    assert "(12.3 kB)" in str(e.value)  # human-readable too


def test_head_too_small_for_embeddings():
    args = tiny_args()
    layer, head, _ = budgets(args)
    with pytest.raises(PlacementError, match=r"head node 'h' is short by 100 bytes"):
        run(args, cluster(node("h", head - 100, head=True), node("w", 20 * layer)))


def test_expert_parallelism_only_when_the_link_is_cheap():
    args = tiny_args(first_k_dense_replace=0)
    layer, head, _ = budgets(args)
    two = [node("a", head + 20 * layer, head=True), node("b", 20 * layer)]
    free_link = run(args, cluster(*two, rtt=0.0, bandwidth=1e15))
    assert [s.helpers for s in free_link.stages] == [["b"]]
    slow_link = run(args, cluster(*two, rtt=0.1, bandwidth=1e9))
    assert all(not s.helpers for s in slow_link.stages)
    assert free_link.tokens_per_s > slow_link.tokens_per_s


def test_plan_json_round_trip_and_measured(tmp_path):
    args = tiny_args()
    layer, head, _ = budgets(args)
    p = run(args, cluster(node("a", head + 5 * layer, head=True), node("b", 5 * layer)))
    p.save(tmp_path / "plan.json")
    q = Plan.load(tmp_path / "plan.json")
    assert [(s.lead, s.start, s.end) for s in q.stages] == [(s.lead, s.start, s.end) for s in p.stages]
    assert q.ms_per_token == pytest.approx(p.ms_per_token, rel=1e-5)
    assert Plan.from_dict(p.to_dict()) == p
    m = p.compare_measured(p.tokens_per_s / 2)
    assert m.ratio == pytest.approx(0.5) and "+100%" in str(m)


def test_replan_when_a_node_leaves_or_joins():
    args = tiny_args()
    layer, head, _ = budgets(args)
    c = cluster(node("a", head + 5 * layer, head=True), node("b", 5 * layer), node("c", 5 * layer))
    p = run(args, c)
    q = run(args, c.without("c"))
    assert covered(q, 8) == list(range(8)) and "c" not in [n.name for n in q.nodes]
    r = run(args, c.without("c").with_node(node("d", 9 * layer, bandwidth=400e9)))
    assert r.tokens_per_s > p.tokens_per_s


@pytest.mark.parametrize("overrides", [
    {"n_group": 1, "topk_group": 1},
    {"num_nextn_predict_layers": 1},
    {"q_lora_rank": 96, "tie_word_embeddings": True},
    {"n_routed_experts": 24, "n_group": 3, "topk_group": 2, "num_experts_per_tok": 6},
    {"first_k_dense_replace": 8},  # no MoE layer at all
])
def test_other_architectures(overrides):
    args = tiny_args(**overrides)
    layer, head, _ = budgets(args)
    c = cluster(node("a", head + 3 * layer, head=True), node("b", 4 * layer), node("c", 4 * layer), rtt=0.0)
    p = run(args, c)
    assert covered(p, 8) == list(range(8))
    assert all(n.memory_free >= 0 for n in p.nodes)
    assert len(p.experts) == sum(args.is_moe_layer(l) for l in range(8))
