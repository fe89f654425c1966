"""Builds (once, at first use) and loads the CPU kernels in `csrc/`. Returns None, after saying why
once, where they cannot be built — torch's own ops serve then. MOEMESH_CPU_KERNELS=0 turns them off."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

SOURCES = Path(__file__).parent / "csrc"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@cache
def cpu_kernels() -> ModuleType | None:
    if os.environ.get("MOEMESH_CPU_KERNELS", "1") == "0":
        return None
    import logging

    import torch

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" is not news here
    from torch.utils.cpp_extension import load

    # -march=native code is only valid on this kind of CPU: key the build by source, CPU and torch.
    files = sorted(SOURCES.glob("*.cpp")) + sorted(SOURCES.glob("*.h"))
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + _cpu_flags().encode()
                         + torch.__version__.encode()).hexdigest()[:12]
    try:
        # -fopenmp without linking libgomp: at::parallel_for then runs on torch's own OpenMP runtime.
        return load(name=f"moemesh_cpu_{key}", sources=[str(f) for f in files if f.suffix == ".cpp"],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or headers: any failure means "use torch's ops"
        print(f"moemesh: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "using torch's matmuls", file=sys.stderr)
        return None
