"""The CPU kernels' instruction-set levels (moemesh/kernels/cpu_ext.py): the levels a CPU offers, how
MOEMESH_CPU_ISA picks one and refuses what it cannot run, one module per level that says what it was built for,
and the torch backend's dispatch: at the scalar level, where no kernels build, and for weights the vector
kernels do not take, quantized weights run torch's matmul on bands dequantized into a reused buffer — never the
kernels' scalar loops. test_kernels.py and test_quant_kernels.py run against every level through `level` below
(one build per level, cached)."""

import pytest
import torch
import torch.nn.functional as F

from moemesh.kernels import cpu_ext
from moemesh.kernels.affine import AffineWeight, affine_linear, to_dense
from moemesh.kernels.base import MlpWeights
from moemesh.kernels.bands import scratch
from moemesh.kernels.cpu_ext import ISA_LEVELS, cpu_isa, cpu_kernels, supported_isas
from moemesh.kernels.formats import AffineScales, fp8_quantize, quantize
from moemesh.kernels.fp8 import Fp8Weight, dequantize as fp8_dense, fp8_linear
from moemesh.kernels.quant_ops import matmul_args
from moemesh.kernels.torch_backend import TorchBackend
from moemesh.spec.config import args_from_dict

LEVELS = supported_isas()
gen = torch.Generator().manual_seed(0)


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch) -> str:
    """Each level this CPU runs, as MOEMESH_CPU_ISA, so that backends made in the test use it too; skips where the
    kernels do not build."""
    monkeypatch.setenv("MOEMESH_CPU_ISA", request.param)
    monkeypatch.delenv("MOEMESH_CPU_KERNELS", raising=False)
    if cpu_kernels() is None:
        pytest.skip("the CPU kernels could not be built on this machine")
    return request.param


@pytest.fixture
def kernels(level):
    return cpu_kernels()


def test_levels_this_cpu_offers(monkeypatch):
    monkeypatch.delenv("MOEMESH_CPU_ISA", raising=False)
    assert LEVELS[-1] == "scalar" and LEVELS == [lv for lv in ISA_LEVELS if lv in LEVELS]  # best first
    flags = cpu_ext._cpu_flags().split()
    if {"avx2", "fma", "f16c", "bmi2"} <= set(flags):
        assert "avx2" in LEVELS
    assert ("avx512" in LEVELS) == ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi"} <= set(flags))
    assert cpu_ext.requested_isa() == LEVELS[0]


def test_unknown_and_unsupported_levels_are_refused(monkeypatch):
    monkeypatch.setenv("MOEMESH_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="'sse9' is not a kernel level; choose one of avx512, avx2, scalar"):
        cpu_kernels()
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: "flags\t: fpu sse sse2")  # an x86-64 CPU of 2003
    monkeypatch.setattr(cpu_ext, "_x86", lambda: True)
    monkeypatch.setenv("MOEMESH_CPU_ISA", "avx2")
    with pytest.raises(ValueError, match="MOEMESH_CPU_ISA=avx2: this CPU cannot run it .*lacks avx2, fma, f16c, bmi2.*runs scalar"):
        cpu_kernels()
    with pytest.raises(ValueError, match="this CPU runs scalar"):
        cpu_kernels("avx512")


def test_each_level_is_its_own_build(kernels, level):
    assert kernels.isa == level and cpu_isa() == level
    assert len({cpu_ext.build_key(lv) for lv in ISA_LEVELS}) == len(ISA_LEVELS)


class Recording:
    """The kernels module, with a record of the calls made to it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)

        return call


def small_args():
    return args_from_dict(dict(model_type="deepseek_v3", vocab_size=64, hidden_size=256, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=32, q_lora_rank=None,
                               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                               quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))


def held(backend, fmt: str, out: int, inp: int):
    """A weight as `backend` holds it, from random float weights."""
    w = torch.randn(out, inp, generator=gen) * 0.05
    if fmt == "fp8":
        q, s = fp8_quantize(w, (128, 128))
        return backend.linear_weight(q, s)
    words, s = quantize(w.bfloat16(), 4, 32)
    return backend.linear_weight(words, AffineScales(s.scales, s.biases, 4, 32))


def dense(w) -> torch.Tensor:
    return fp8_dense(w) if isinstance(w, Fp8Weight) else to_dense(w, torch.float32)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_weights_reach_the_vector_kernels_or_torch_bands(level, fmt):
    """At a vector level, decode steps multiply FP8 and lane-major weights in the kernels; at the scalar level (and
    for an affine weight whose groups do not fill 16-group spans, at any level) torch multiplies bands the kernels
    dequantize into one reused buffer: the kernels' scalar loops never run a quantized weight."""
    backend = TorchBackend(small_args(), "bfloat16")
    backend.kernels = rec = Recording(backend.kernels)
    fits = held(backend, fmt, 600, 256)
    odd = held(backend, "int4", 600, 96)  # 3 groups per row: 1800 groups, not whole spans
    assert odd.lanes is False and (fmt == "fp8" or fits.lanes == (level != "scalar"))
    x = torch.randn(2, 256, generator=gen).bfloat16()
    for w, inp in ((fits, 256), (odd, 96)):
        rec.calls.clear()
        y = backend.linear(x[:, :inp], w).float()
        want = x[:, :inp].float() @ dense(w).T
        assert ((y - want).abs() <= 0.01 * want.abs().max()).all()
        names = [c[0] for c in rec.calls]
        vector = level != "scalar" and w is fits
        assert names == (["linear_q"] if vector else ["dequantize_q"] * len(names)) and names, names
        if not vector:  # bands into one buffer, reused
            outs = {c[1][3].data_ptr() for c in rec.calls}
            assert len(outs) == 1 and rec.calls[0][1][3].dtype == torch.bfloat16
    mlp = MlpWeights(held(backend, fmt, 128, 256), held(backend, fmt, 128, 256), held(backend, fmt, 256, 128))
    rec.calls.clear()
    backend.mlp(mlp, x)
    assert ("mlp_q" in [c[0] for c in rec.calls]) == (level != "scalar")
    assert all(matmul_args(w, backend.kernels) is None for w in (odd, *([fits] if level == "scalar" else [])))


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_torch_bands_without_kernels(monkeypatch, fmt):
    """No kernels (no compiler, MOEMESH_CPU_KERNELS=0): torch dequantizes each band into the thread's reused
    buffer, in float32 math rounded once, as formats.py defines the weight."""
    monkeypatch.setenv("MOEMESH_CPU_KERNELS", "0")
    backend = TorchBackend(small_args(), "bfloat16")
    assert backend.kernels is None
    w = held(backend, fmt, 700, 256)
    x = torch.randn(3, 256, generator=gen).bfloat16()
    band = scratch("band", 1, torch.bfloat16)
    y = backend.linear(x, w)
    assert torch.equal(y, (fp8_linear if fmt == "fp8" else affine_linear)(x, w))
    assert scratch("band", 1, torch.bfloat16).data_ptr() == band.data_ptr() or band.numel() == 1
    want = F.linear(x.float(), dense(w).bfloat16().float())
    assert ((y.float() - want).abs() <= 0.01 * want.abs().max()).all()
