"""Builds (once per machine and install) and loads the CPU kernels in `csrc/`. Returns None, after saying why
once, where they cannot be built — torch's own ops serve then. MOEMESH_CPU_KERNELS=0 turns them off.

The build lands next to the installed package (`kernels/_build/`), or in the user's cache where that is not
writable, so every process and every user of one install shares it. Processes that start while another is
building wait on its lock (torch's build baton) and say so once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from ..spec.formats import kernel_defines

SOURCES = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", *kernel_defines()]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


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


def build_key() -> str:
    """-march=native code is only valid on this kind of CPU: key the build by source, flags, CPU and torch."""
    import torch

    files = sorted(SOURCES.glob("*.cpp")) + sorted(SOURCES.glob("*.h"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(FLAGS).encode()
                          + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:12]


@cache
def cpu_kernels() -> ModuleType | None:
    if os.environ.get("MOEMESH_CPU_KERNELS", "1") == "0":
        return None
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" is not news here
    from torch.utils.cpp_extension import load

    name = f"moemesh_cpu_{build_key()}"
    try:
        build = _build_root() / name
        build.mkdir(exist_ok=True)
        if not (build / f"{name}.so").exists():
            waiting = (build / "lock").exists()
            print(f"moemesh: {'waiting for another process to build' if waiting else 'building'} the CPU kernels "
                  "for this machine (once; about a minute)...", file=sys.stderr, flush=True)
        # -fopenmp without linking libgomp: at::parallel_for then runs on torch's own OpenMP runtime.
        return load(name=name, sources=[str(f) for f in sorted(SOURCES.glob("*.cpp"))], extra_cflags=FLAGS,
                    build_directory=str(build), verbose=False)
    except Exception as e:  # a missing compiler or headers: any failure means "use torch's ops"
        print(f"moemesh: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "using torch's matmuls", file=sys.stderr)
        return None


def cpu_isa() -> str | None:
    """The instruction-set level the loaded kernels were built for; None where they do not run."""
    return "native" if cpu_kernels() is not None else None
