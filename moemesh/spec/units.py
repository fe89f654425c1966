"""Quantities people write — on the command line ("30s", "8GB") and in cluster files ("273 GB/s", "0.3 ms",
"8.5 TFLOPS") — read into base units (bytes, bytes/s, flop/s, seconds), and bytes written back for people.
Decimal prefixes (k, M, G, T, P) are powers of 1000; binary ones (Ki, Mi, Gi, Ti) powers of 1024.
"""

from __future__ import annotations

import re
from typing import Any

KINDS = ("bytes", "bytes/s", "flop/s", "seconds")
_PREFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "m": 60.0, "min": 60.0, "h": 3600.0}
_BASES = {"bytes": {"B": 1.0, "": 1.0}, "bytes/s": {"B/s": 1.0, "bit/s": 1 / 8, "bps": 1 / 8, "b/s": 1 / 8},
          "flop/s": {"FLOPS": 1.0, "FLOP/s": 1.0, "flops": 1.0, "flop/s": 1.0}}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*$")


def _scale(unit: str, kind: str) -> float | None:
    if kind == "seconds":
        return _TIME.get(unit)
    for base, scale in _BASES[kind].items():
        if unit.endswith(base) and unit[: len(unit) - len(base)] in _PREFIX:
            return _PREFIX[unit[: len(unit) - len(base)]] * scale
    if kind == "bytes":  # sizes typed by hand: "8gb", "512mib", "8g"
        lower = {k.lower(): v for k, v in _PREFIX.items()}
        stem = unit.lower().removesuffix("b")
        return lower.get(stem)
    return None


def parse_quantity(value: Any, kind: str) -> float:
    """`value` (a number, or a string with a unit) in base units; kind is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of quantity '{kind}'")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number or a string with a unit, got {value!r}")
    if not isinstance(value, str):
        return float(value)
    m = _QUANTITY.match(value)
    if not m:
        raise ValueError(f"cannot read '{value}' as a number with a unit")
    number, unit = float(m.group(1)), m.group(2)
    scale = 1.0 if not unit else _scale(unit, kind)
    if scale is None:
        raise ValueError(f"unit '{unit}' in '{value}' is not a unit of {kind}")
    return number * scale


def seconds(text: str) -> float:
    return parse_quantity(text, "seconds")


def size_bytes(text: str) -> int:
    return int(parse_quantity(text, "bytes"))


def fmt_bytes(n: float) -> str:
    """Bytes for people, decimal units: '512 B', '12.3 kB', '1.5 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)
