"""The CPU kernels' instruction-set levels (moemesh/kernels/cpu_ext.py): the levels a CPU offers, how
MOEMESH_CPU_ISA picks one and refuses what it cannot run, one module per level that says what it was built for,
and the torch backend's dispatch: at the scalar level, where no kernels build, and for weights the vector
kernels do not take, quantized weights run torch's matmul on bands dequantized into a reused buffer — never the
kernels' scalar loops. test_kernels.py and test_quant_kernels.py run against every level through `level` below
(one build per level, cached)."""

import os
import subprocess
import sys
import threading

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


def test_a_killed_build_blocks_nothing(tmp_path, capfd):
    """The build's lock is an flock, released when its holder dies: a builder that is alive is waited for (and
    named), one killed midway stops blocking at once, and the lock file torch leaves (which older torch waits on
    for as long as it exists) is removed by the next builder."""
    pid_file = tmp_path / "builder.pid"
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); "
            "f.truncate(); f.write('4242'); f.flush(); print('held', flush=True); time.sleep(60)")
    builder = subprocess.Popen([sys.executable, "-c", hold, str(pid_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "held"
        (tmp_path / "lock").write_text("")  # torch's, as a killed build leaves it
        killed = threading.Event()
        threading.Timer(0.5, lambda: (killed.set(), builder.kill())).start()
        with cpu_ext._builder(tmp_path, "avx2"):
            assert killed.is_set()  # waited for the holder, until it died
            assert not (tmp_path / "lock").exists() and pid_file.read_text() == str(os.getpid())
    finally:
        builder.kill()
        builder.wait(timeout=10)
    assert "waiting for process 4242 to build the avx2 CPU kernels" in capfd.readouterr().err
    with cpu_ext._builder(tmp_path, "avx2"):  # no holder: at once
        pass


def test_builds_run_pips_ninja(monkeypatch):
    """pip's ninja comes first on PATH while building (another ninja reads the build's log as foreign and rebuilds
    everything), and PATH is as it was afterwards."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(ninja.BIN_DIR), "/bin"]))
    with cpu_ext._pip_ninja():
        assert os.environ["PATH"].split(os.pathsep) == [str(ninja.BIN_DIR), "/usr/bin", "/bin"]
    assert os.environ["PATH"] == os.pathsep.join(["/usr/bin", str(ninja.BIN_DIR), "/bin"])


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
        if not vector:  # bands into one buffer, reused; float32 in a decode step (bands.py)
            outs = {c[1][3].data_ptr() for c in rec.calls}
            assert len(outs) == 1 and rec.calls[0][1][3].dtype == torch.float32
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
    y = backend.linear(x, w)
    band = scratch("band", 1, torch.float32).data_ptr()  # a decode step's bands: float32 (bands.py)
    assert torch.equal(y, (fp8_linear if fmt == "fp8" else affine_linear)(x, w))
    assert scratch("band", 1, torch.float32).data_ptr() == band  # the same buffer, not a new one per call
    want = F.linear(x.float(), dense(w).bfloat16().float())
    assert ((y.float() - want).abs() <= 0.01 * want.abs().max()).all()
