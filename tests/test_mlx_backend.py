"""The MLX backend against transformers on the reference shapes (float32), as test_reference.py holds the
torch backend; and on the official FP8 format. (mlx-lm-quantized checkpoints: test_quantization.py.)"""

import pytest
import torch
from hf_reference import SHAPES, build_checkpoint, convert_to_fp8, make_config

import moemesh

pytest.importorskip("mlx.core", reason="mlx is not installed (Linux: pip install 'mlx[cpu]')")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    config = make_config(**SHAPES[request.param])
    return path, config, build_checkpoint(path, config)


def test_full_forward_logits_match_transformers(checkpoint):
    path, _, reference = checkpoint
    ids = torch.randint(0, reference.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    got = moemesh.load(path, backend="mlx", dtype="float32").logits(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_incremental_decode_equals_full_forward(checkpoint):
    path, config, _ = checkpoint
    engine = moemesh.load(path, backend="mlx", dtype="float32")
    ids = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))[0].tolist()
    full = engine.logits([ids])[0]
    step = engine.step_fn(engine.new_cache())
    for start, end in [(0, 7), (7, 8), (8, 15), *[(t, t + 1) for t in range(15, 20)]]:
        assert (torch.from_numpy(step(ids[start:end], start)) - full[end - 1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape, block", [("odd_dims_4groups", (128, 128)), ("odd_dims_4groups", (16, 8)), ("base", (4, 4))])
def test_fp8_checkpoint_matches_the_torch_backend(tmp_path, shape, block):
    """The torch backend's FP8 path is held to transformers on the dequantized weights (test_reference.py).
    (4, 4) blocks fill BASE's MLA head dims, so kv_b_proj's halves stay FP8 there too."""
    config = make_config(**SHAPES[shape])
    build_checkpoint(tmp_path / "src", config)
    convert_to_fp8(tmp_path / "src", tmp_path / "fp8", block)
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    expected = moemesh.load(tmp_path / "fp8", dtype="float32").logits(ids)
    engine = moemesh.load(tmp_path / "fp8", backend="mlx", dtype="float32")
    assert (engine.logits(ids) - expected).abs().max().item() <= 1e-4
    assert engine.weight_bytes < moemesh.load(tmp_path / "src", backend="mlx", dtype="float32").weight_bytes / 2
