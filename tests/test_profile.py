"""A node's profile measures its decode path on the weights as it will hold them: bytes and flops of one
timed run, counted with the planner's byte accounting, so the planner's time model gives back that run."""

import pytest

from moemesh.kernels.profile import decode_profile
from moemesh.spec.sizes import WeightFormat
from moemesh.spec.layout import mlp_shapes


@pytest.mark.parametrize("fmt,group", [("bf16", 64), ("fp8", 64), ("int4", 64), ("int8", 32), ("int4", 128)])
def test_decode_profile_counts_the_formats_bytes(fmt, group):
    hidden, inter = 256, 128
    bytes_per_s, flops_per_s = decode_profile(hidden, inter, fmt, group, budget=4 << 20, repeats=1)
    assert bytes_per_s > 0 and flops_per_s > 0
    held = sum(WeightFormat(fmt, group_size=group).linear_bytes(s) for s in mlp_shapes(hidden, inter).values())
    # One measurement, two units: flops / bytes is the format's flops per byte held.
    assert flops_per_s / bytes_per_s == pytest.approx(6 * hidden * inter / held, rel=1e-9)
