"""The planner on routing statistics the engine records on real text (the demo model, this repo's own
docs as input): every MoE layer's placement reaches balancedness >= 0.95 with 10% redundant experts,
at least EPLB's on equal nodes and above it on unequal ones."""

from pathlib import Path

import pytest

import moemesh
from moemesh.demo import build_demo_checkpoint
from moemesh.placement.experts import balancedness, node_loads, place_eplb, place_ours

TEXT = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = build_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    engine = moemesh.load(path, dtype="float32")
    ids = engine.tokenizer.encode(TEXT)[:1536]
    for i in range(0, len(ids) - 256 + 1, 256):
        engine.logits([ids[i : i + 256]])
    stats = engine.routing_stats()
    path_json = tmp_path_factory.mktemp("stats") / "routing.json"
    stats.save(path_json)  # the JSON the planner's --stats reads
    return type(stats).load(path_json), engine.args


def test_recorded_trace_is_skewed_and_complete(recorded):
    stats, args = recorded
    assert sorted(stats.layers) == [layer for layer in range(args.num_hidden_layers) if args.is_moe_layer(layer)]
    for counts in stats.layers.values():
        assert sum(counts) == stats.tokens * args.num_experts_per_tok
        assert max(counts) > 1.5 * sum(counts) / len(counts)  # real routing is uneven


@pytest.mark.parametrize("rates", [[1.0] * 4, [2.0, 1.0, 1.0, 0.5]], ids=["equal", "unequal"])
def test_balanced_placement_of_a_recorded_trace(recorded, rates):
    stats, args = recorded
    E = args.n_routed_experts
    redundant = round(0.1 * E)
    slots = [E // len(rates) + redundant] * len(rates)
    for layer, counts in stats.layers.items():
        loads = [c / sum(counts) for c in counts]
        ours = balancedness(node_loads(place_ours(loads, rates, slots, args.n_group, redundant), loads, 4), rates)
        eplb = balancedness(node_loads(place_eplb(loads, 4, redundant), loads, 4), rates)
        assert ours >= 0.95, f"layer {layer}"
        assert ours >= eplb - 1e-9 if len(set(rates)) == 1 else ours > eplb, f"layer {layer}"
