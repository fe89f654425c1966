"""Expert placement: balancedness on skewed load, against EPLB, and the single-token factor."""

import pytest

from moemesh.spec.routing import RoutingStats
from moemesh.placement import plan
from moemesh.placement.experts import (_water_fill, balancedness, decode_imbalance, node_loads, place_eplb,
                                       place_ours)
from test_placement_support import EXAMPLES, REAL_CONFIG, zipf_loads

E, GROUPS, REDUNDANT = 256, 8, 26  # DeepSeek-V3's layer, 10% redundant experts
EQUAL = [1.0] * 8
UNEQUAL = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]  # e.g. M4 Pro minis beside M4 Max / Ultra boxes


def slots_for(rates):
    return [(E + REDUNDANT) // len(rates) + 4] * len(rates)  # room for EPLB's equal share and a little more


def check_valid(reps, slots):
    assert len(reps) == E
    held = [0] * len(slots)
    for r in reps:
        assert r and sum(f for _, f in r) == pytest.approx(1.0)
        assert len({g for g, _ in r}) == len(r)
        for g, _ in r:
            held[g] += 1
    assert all(h <= s for h, s in zip(held, slots))


def test_water_fill_by_hand():
    assert _water_fill(1.0, [0.0, 0.0], [1.0, 1.0]) == pytest.approx([0.5, 0.5])
    assert _water_fill(1.0, [0.5, 0.0], [1.0, 1.0]) == pytest.approx([0.25, 0.75])
    assert _water_fill(1.0, [0.0, 0.0], [1.0, 3.0]) == pytest.approx([0.25, 0.75])
    assert _water_fill(0.1, [0.0, 5.0], [1.0, 1.0]) == pytest.approx([0.1, 0.0])


def test_eplb_by_hand():
    # EPLB: replicate the highest load-per-replica expert (e0: 4 -> 2+2, e1: 3 -> 1.5+1.5), then pack
    # 3 physical experts per node by descending weight into the lighter node: 2+2+1 and 2+1.5+1.5
    reps = place_eplb([4.0, 3.0, 2.0, 1.0], n_nodes=2, redundant=2)
    assert node_loads(reps, [4.0, 3.0, 2.0, 1.0], 2) == pytest.approx([5.0, 5.0])
    assert reps[0] == [(0, 0.5), (1, 0.5)] and sorted(f for _, f in reps[1]) == [1.0] or reps[1] == [(1, 1.0)]


@pytest.mark.parametrize("seed", range(5))
def test_zipf_balanced_with_ten_percent_redundancy(seed):
    loads = zipf_loads(E, 1.0, seed)
    for rates in (EQUAL, UNEQUAL):
        slots = slots_for(rates)
        ours = place_ours(loads, rates, slots, GROUPS, REDUNDANT)
        check_valid(ours, slots)
        b_ours = balancedness(node_loads(ours, loads, 8), rates)
        b_eplb = balancedness(node_loads(place_eplb(loads, 8, REDUNDANT), loads, 8), rates)
        assert b_ours >= 0.95
        if rates is EQUAL:
            assert b_ours >= b_eplb - 1e-9
        else:
            assert b_ours > b_eplb + 0.1  # EPLB gives every node the same share whatever its speed
    without = place_ours(loads, EQUAL, [E // 8] * 8, GROUPS, 0)
    assert balancedness(node_loads(without, loads, 8), EQUAL) < 0.95  # replicas are what gets it there


def test_groups_stay_on_one_node_without_skew():
    reps = place_ours([1 / E] * E, EQUAL, [E // 8] * 8, GROUPS, 0)
    size = E // GROUPS
    for g in range(GROUPS):
        assert len({reps[e][0][0] for e in range(g * size, (g + 1) * size)}) == 1


def test_single_token_imbalance():
    assert decode_imbalance(1, 256, 8, 4, 8) == 1.0
    # 8 nodes, one group each: a token's 8 experts fall in 4 groups, so at least 2 on one node
    k8 = decode_imbalance(8, 256, 8, 4, 8)
    assert 2.0 < k8 < 8.0
    assert decode_imbalance(2, 256, 8, 4, 8) < decode_imbalance(4, 256, 8, 4, 8) < k8


def test_real_model_with_zipf_statistics():
    stats = RoutingStats(E)
    for layer in range(3, 61):
        stats.add(layer, [round(x * 1e6) for x in zipf_loads(E, 1.0, layer)])
    p = plan(REAL_CONFIG, EXAMPLES / "mac-mini-m4pro-x8.yaml", stats=stats, quant="int4", mtp=False)
    before, after = p.balancedness()
    assert after >= 0.95 and after > before
