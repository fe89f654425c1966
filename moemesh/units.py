"""Quantities people type on the command line: durations ("30s", "2m") and sizes ("8GB", "512MiB")."""

from __future__ import annotations

import re

_SIZE = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"": 1, "s": 1, "ms": 1e-3, "m": 60, "min": 60, "h": 3600}


def _parse(text: str, units: dict[str, float], what: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"cannot read {text!r} as a {what} (e.g. {'30s, 2m' if what == 'duration' else '8GB, 512MiB'})")
    return float(m.group(1)) * units[m.group(2).lower()]


def seconds(text: str) -> float:
    return _parse(text, _TIME, "duration")


def size_bytes(text: str) -> int:
    return int(_parse(text, _SIZE, "size"))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)
