"""Builds (once per machine, install and instruction-set level) and loads the CPU kernels in `csrc/`. Returns
None, after saying why once, where they cannot be built — torch's own ops serve then. MOEMESH_CPU_KERNELS=0
turns them off.

Levels (`ISA_LEVELS`), best first; each is its own build, cached separately:

- `avx512`: `-march=native`, offered where the CPU has AVX512-BF16 and AVX512-VBMI, which its bf16 and FP8
  kernels use;
- `avx2`: AVX2, FMA, F16C and BMI2 (`-mno-avx512f`, tuned for this CPU);
- `scalar`: nothing beyond the architecture's baseline. Its matmuls are plain loops, so the torch backend
  uses it only to dequantize bands of quantized weights for torch's matmul (docs/quantization.md, "Dispatch").

The best level this CPU runs is the default; `MOEMESH_CPU_ISA=avx512|avx2|scalar` forces one. The level is
printed once per process (stderr) and reported by `cpu_isa()`.

The build lands next to the installed package (`kernels/_build/`), or in the user's cache where that is not
writable, so every process and every user of one install shares it. Processes that start while another is
building wait for it and say so once; a build killed midway blocks nothing (`_builder`). It runs pip's `ninja`
(a dependency) whatever else PATH holds: another version reads the build's log as foreign and rebuilds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType

from ..spec.formats import kernel_defines

SOURCES = Path(__file__).parent / "csrc"
ISA_LEVELS = ("avx512", "avx2", "scalar")
# The /proc/cpuinfo flags each x86-64 level's code needs; `scalar` needs none.
_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi"),
          "avx2": ("avx2", "fma", "f16c", "bmi2")}
_LEVEL_FLAGS = {"avx512": ["-march=native"],
                "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mno-avx512f", "-mtune=native"],
                "scalar": []}
# -fopenmp without linking libgomp: at::parallel_for then runs on torch's own OpenMP runtime. Hidden
# visibility: the levels' modules define the same C++ names and may be loaded into one process (the tests).
_COMMON_FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden", *kernel_defines()]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def supported_isas() -> list[str]:
    """The levels this CPU can run, best first (`scalar` always)."""
    have = set(_cpu_flags().split())
    return [level for level in ISA_LEVELS if level == "scalar" or (_x86() and have.issuperset(_NEEDS[level]))]


def requested_isa() -> str:
    """MOEMESH_CPU_ISA if set (checked against this CPU), else the best level it supports."""
    level, supported = os.environ.get("MOEMESH_CPU_ISA", ""), supported_isas()
    if not level:
        return supported[0]
    if level not in ISA_LEVELS:
        raise ValueError(f"MOEMESH_CPU_ISA={level!r} is not a kernel level; choose one of {', '.join(ISA_LEVELS)}")
    if level not in supported:
        missing = [f for f in _NEEDS.get(level, ()) if f not in _cpu_flags().split()] if _x86() else ["an x86-64 CPU"]
        raise ValueError(f"MOEMESH_CPU_ISA={level}: this CPU cannot run it (it lacks {', '.join(missing)}); "
                         f"it runs {', '.join(supported)}")
    return level


def flags(level: str) -> list[str]:
    return _LEVEL_FLAGS[level] + _COMMON_FLAGS


def _build_root() -> Path:
    """Beside the package when it is writable (one build per install), else the user's cache."""
    for root in (Path(__file__).parent / "_build",
                 Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moemesh" / "kernels"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    raise OSError("no writable directory for the CPU kernels' build")


def build_key(level: str) -> str:
    """-march=native code is only valid on this kind of CPU: key the build by level, source, flags, CPU and torch."""
    import torch

    files = sorted(SOURCES.glob("*.cpp")) + sorted(SOURCES.glob("*.h"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(flags(level)).encode()
                          + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:12]


def cpu_kernels(isa: str | None = None) -> ModuleType | None:
    """The kernels built for `isa` (default: `requested_isa()`), or None where they are off or cannot build.
    An unknown level, or one this CPU cannot run, is a ValueError. One module per level and process."""
    if os.environ.get("MOEMESH_CPU_KERNELS", "1") == "0":
        return None
    level = isa or requested_isa()
    if level not in supported_isas():
        raise ValueError(f"CPU kernel level {level!r}: this CPU runs {', '.join(supported_isas())}")
    return _load(level)


def cpu_isa() -> str | None:
    """The level of the kernels this process runs (`cpu_kernels()`), or None where torch's ops serve alone."""
    kernels = cpu_kernels()
    return None if kernels is None else kernels.isa


@contextmanager
def _builder(build: Path, level: str) -> Iterator[None]:
    """Held while this process loads or builds `build`: an flock, which the kernel releases when its holder dies,
    so a build killed midway leaves nothing that blocks the next. Holding it, no live builder exists, so the lock
    file torch leaves (older versions wait for as long as it exists) is stale and goes."""
    with open(build / "builder.pid", "a+") as owner:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner.seek(0)
            print(f"moemesh: waiting for process {owner.read().strip() or '?'} to build the {level} CPU kernels...",
                  file=sys.stderr, flush=True)
            fcntl.flock(owner, fcntl.LOCK_EX)
        owner.seek(0)
        owner.truncate()
        owner.write(str(os.getpid()))
        owner.flush()
        (build / "lock").unlink(missing_ok=True)
        yield


@contextmanager
def _pip_ninja() -> Iterator[None]:
    """PATH with pip's ninja first, for the build's duration."""
    try:
        import ninja

        first = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        first = None
    path = os.environ.get("PATH", "")
    if first:
        os.environ["PATH"] = os.pathsep.join([first] + [p for p in path.split(os.pathsep) if p != first])
    try:
        yield
    finally:
        os.environ["PATH"] = path


@cache
def _load(level: str) -> ModuleType | None:
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" is not news here
    from torch.utils.cpp_extension import load

    name = f"moemesh_cpu_{level}_{build_key(level)}"
    try:
        build = _build_root() / name
        build.mkdir(exist_ok=True)
        with _builder(build, level), _pip_ninja():
            if not (build / f"{name}.so").exists():
                print(f"moemesh: building the {level} CPU kernels for this machine (once; about a minute)...",
                      file=sys.stderr, flush=True)
            module = load(name=name, sources=[str(f) for f in sorted(SOURCES.glob("*.cpp"))], extra_cflags=flags(level),
                          build_directory=str(build), verbose=False)
    except Exception as e:  # a missing compiler or headers: any failure means "use torch's ops"
        print(f"moemesh: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "using torch's matmuls", file=sys.stderr)
        return None
    note = "" if level == supported_isas()[0] else f"; this CPU's best: {supported_isas()[0]}"
    print(f"moemesh: CPU kernels: {module.isa}{note}", file=sys.stderr, flush=True)
    return module
