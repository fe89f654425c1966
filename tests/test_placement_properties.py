"""Property test: on random small models and clusters, every plan is complete, within memory,
and never slower than the greedy first-fit split."""

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moemesh.placement import PlacementError, plan
from moemesh.placement.experts import balancedness, node_loads, place_ours
from moemesh.placement.planner import evaluate, problem
from moemesh.placement.search import Stage
from moemesh.spec.sizes import WeightFormat, model_sizes
from moemesh.placement.strategies import greedy_stages
from test_placement_support import cluster, node, tiny_args

CONTEXT = 32


@st.composite
def cases(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    experts = n_group * draw(st.sampled_from([2, 4]))
    top_k = draw(st.integers(1, min(4, experts)))
    topk_group = draw(st.integers(1, n_group))
    while top_k > topk_group * (experts // n_group):
        topk_group += 1
    args = tiny_args(num_hidden_layers=draw(st.integers(2, 9)), n_routed_experts=experts, n_group=n_group,
                     topk_group=topk_group, num_experts_per_tok=top_k,
                     first_k_dense_replace=draw(st.integers(0, 2)))
    total = model_sizes(args, WeightFormat("bf16")).weight_bytes
    n_nodes = draw(st.integers(1, 5))
    # each node gets 0.2x to 2.5x an even share of the model: some clusters fit, some do not
    nodes = [node(f"n{i}", draw(st.floats(0.2, 2.5)) * total / n_nodes, head=i == 0,
                  bandwidth=draw(st.sampled_from([50e9, 100e9, 400e9])), compute=draw(st.sampled_from([1e12, 20e12])))
             for i in range(n_nodes)]
    rtt = draw(st.sampled_from([0.0, 1e-5, 3e-4]))
    return args, cluster(*nodes, rtt=rtt)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_plans_are_complete_within_budget_and_beat_greedy(case):
    args, c = case
    p = problem(args, c, None, CONTEXT, "bf16")
    greedy = greedy_stages(c, p.tm)
    try:
        result = plan(args, c, context=CONTEXT, quant="bf16")
    except PlacementError:
        assert greedy is None  # the search never misses a plan that first-fit finds
        return
    assert [l for s in result.stages for l in range(s.start, s.end)] == list(range(args.num_hidden_layers))
    for n in result.nodes:
        assert n.memory_used <= n.memory_budget
    assert [l.layer for l in result.experts] == [l for l in range(args.num_hidden_layers) if args.is_moe_layer(l)]
    for layer in result.experts:
        assert len(layer.replicas) == args.n_routed_experts
        for reps in layer.replicas:
            assert reps and abs(sum(f for _, f in reps) - 1) < 1e-9
    if greedy is not None:
        assert result.ms_per_token <= evaluate(p, greedy).ms_per_token * (1 + 1e-9) + 1e-6


@st.composite
def expert_cases(draw):
    n_group = draw(st.sampled_from([1, 2, 4, 8]))
    experts = n_group * draw(st.integers(1, 8))
    loads = draw(st.lists(st.floats(0.0, 1.0), min_size=experts, max_size=experts))
    n_nodes = draw(st.integers(1, 6))
    rates = draw(st.lists(st.floats(0.5, 4.0), min_size=n_nodes, max_size=n_nodes))
    slots = draw(st.lists(st.integers(0, experts), min_size=n_nodes, max_size=n_nodes))
    slots[0] += max(0, experts - sum(slots))  # enough room for one copy of each expert
    return loads, rates, slots, n_group, draw(st.integers(0, experts // 2))


@settings(max_examples=150, deadline=None)
@given(expert_cases())
def test_expert_placement_is_complete_within_slots_and_replicas_never_hurt(case):
    loads, rates, slots, n_group, redundant = case
    reps = place_ours(loads, rates, slots, n_group, redundant)
    held = [0] * len(rates)
    for r in reps:
        assert r and abs(sum(f for _, f in r) - 1) < 1e-9 and len({g for g, _ in r}) == len(r)
        for g, _ in r:
            held[g] += 1
    assert all(h <= s for h, s in zip(held, slots))
    base = place_ours(loads, rates, slots, n_group, 0)
    assert balancedness(node_loads(reps, loads, len(rates)), rates) >= \
        balancedness(node_loads(base, loads, len(rates)), rates) - 1e-9


def _all_pipelines(names: list[str], head: str, n_layers: int):
    """Every pipeline of single-node stages: any subset of nodes, any order (the head, if used, first),
    any split into contiguous non-empty ranges."""
    for k in range(1, len(names) + 1):
        for order in itertools.permutations(names, k):
            if head in order and order[0] != head:
                continue
            for cuts in itertools.combinations(range(1, n_layers), k - 1):
                bounds = (0,) + cuts + (n_layers,)
                yield [Stage(n, a, b) for n, a, b in zip(order, bounds, bounds[1:])]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_pipeline_search_matches_brute_force(case):
    args, c = case
    if args.num_hidden_layers > 6 or len(c.nodes) > 3:
        args = tiny_args(num_hidden_layers=5, n_routed_experts=args.n_routed_experts, n_group=args.n_group,
                         topk_group=args.topk_group, num_experts_per_tok=args.num_experts_per_tok)
        c = cluster(*c.nodes[:3], rtt=c.default_link.rtt)
    p = problem(args, c, None, CONTEXT, "bf16")
    best = None
    for stages in _all_pipelines([n.name for n in c.nodes], c.head.name, args.num_hidden_layers):
        try:
            t = evaluate(p, stages).ms_per_token
        except PlacementError:
            continue
        best = t if best is None else min(best, t)
    try:
        found = plan(args, c, context=CONTEXT, quant="bf16", max_group=1)
    except PlacementError:
        assert best is None
        return
    assert best is not None and found.ms_per_token <= best * (1 + 1e-9) + 1e-6
