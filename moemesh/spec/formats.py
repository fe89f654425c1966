"""The weight formats' constants, in one place for Python and the C++ kernels (docs/formats.md specifies
every layout byte by byte).

- FP8: e4m3 values with one float32 `scale_inv` per block of `FP8_BLOCK` (the official DeepSeek-V3 format).
- MLX affine: `bits`-bit unsigned integers packed into uint32 words, first value in the lowest bits, with a
  scale and a bias per group of `group_size` consecutive inputs (what `mx.quantize` and mlx-lm write).
- Lane-major: how the CPU kernels hold an affine weight in memory (never on disk): its groups, row after
  row, cut into spans of `LANE_SPAN`, each span's words transposed (`lane_major_word`).
"""

from __future__ import annotations

from enum import IntEnum

BITS = (4, 8)  # MLX affine formats moemesh runs
GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = (128, 128)  # the official checkpoints' block, and the only one the CPU kernels take
FP8_E4M3_MAX = 448.0  # largest finite e4m3 value: a block's scale_inv is its amax / this
LANE_SPAN = 16  # groups per lane-major span: one fp32 vector of scales


class Kind(IntEnum):
    """How the CPU kernels are told a weight's format (csrc/quant.h's `Kind`, compiled from these values)."""
    BF16 = 0
    FP8 = 1
    INT4 = 2
    INT8 = 3
    INT4_LANES = 4  # INT4/INT8 in the lane-major layout
    INT8_LANES = 5


def affine_kind(bits: int, lanes: bool) -> Kind:
    return Kind[f"INT{bits}{'_LANES' if lanes else ''}"]


def kernel_defines() -> list[str]:
    """Compiler flags that give csrc/quant.h these constants (`-DMOEMESH_KIND_BF16=0` ...)."""
    return [f"-DMOEMESH_KIND_{k.name}={k.value}" for k in Kind] + [f"-DMOEMESH_FP8_BLOCK={FP8_BLOCK[0]}"]


def lane_major_word(i, words_per_group: int):
    """Where word `i` of an affine weight (MLX order, rows back to back) sits in the lane-major layout.

    Spans of LANE_SPAN groups hold their words as [words_per_group][LANE_SPAN] instead of MLX's
    [LANE_SPAN][words_per_group]. Plain integer arithmetic: `i` may be an int or an integer array."""
    span_words = LANE_SPAN * words_per_group
    span, in_span = i // span_words, i % span_words
    return span * span_words + in_span % words_per_group * LANE_SPAN + in_span // words_per_group
