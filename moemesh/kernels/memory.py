"""Where the torch backend's resident weights live, for the copies a load makes (lane-major int4/int8 words,
fused gate/up rows, FP8 kv_b halves): letting go of the checkpoint pages they were copied from, and holding
them in 2 MB pages."""

from __future__ import annotations

import ctypes
import math
import mmap
import sys

import torch

_LIBC = ctypes.CDLL(None)
_MADV_DONTNEED, _MADV_HUGEPAGE, _MADV_PAGEOUT = 4, 14, 21  # Linux (PAGEOUT: >= 5.4); others ignore or refuse
_HUGE = 2 << 20


def _madvise(start: int, length: int, advice: int) -> None:
    if length > 0 and sys.platform == "linux":
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice)


def _whole_pages(t: torch.Tensor) -> tuple[int, int]:
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    return start, (t.data_ptr() + t.nbytes) // page * page - start


def page_out(t: torch.Tensor) -> None:
    """Drop the pages wholly inside t's bytes from this process's resident set, where t was copied and is
    not read again: checkpoint pages stay mapped, and counted, until reclaimed. Nothing is lost — clean file
    pages are re-read, anonymous ones swapped — and kernels without MADV_PAGEOUT ignore the hint."""
    _madvise(*_whole_pages(t), _MADV_PAGEOUT)


class HugePageArena:
    """Tensors for load-time weight copies, cut in order from 64 MB chunks that ask the kernel for 2 MB pages
    (MADV_HUGEPAGE; transparent huge pages in "madvise" mode, the usual default, grant them). A decode step
    streams every held weight, and with 4 KB pages each 4 KB costs a TLB miss (in a virtual machine, a
    two-level page walk). A chunk's memory lives as long as any tensor cut from it; pages never touched are
    never resident."""

    CHUNK = 64 << 20

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._next = self._end = 0

    @staticmethod
    def _region(nbytes: int) -> tuple[torch.Tensor, int]:
        """An untouched buffer holding nbytes from a 2 MB boundary on (returned as the buffer, that offset)."""
        buffer = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
        start = -(-buffer.data_ptr() // _HUGE) * _HUGE
        _madvise(start, -(-nbytes // _HUGE) * _HUGE, _MADV_HUGEPAGE)
        return buffer, start - buffer.data_ptr()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.CHUNK // 4:  # a large weight takes a region of its own
            buffer, offset = self._region(nbytes)
        else:
            if self._chunk is None or self._next + nbytes > self._end:
                self._chunk, self._next = self._region(self.CHUNK)
                self._end = self._next + self.CHUNK
            buffer, offset = self._chunk, self._next
            self._next += -(-nbytes // 64) * 64  # 64-byte aligned: one cache line per kernel load
        return buffer[offset : offset + nbytes].view(dtype).view(shape)

    @staticmethod
    def release(t: torch.Tensor) -> None:
        """Free the memory of a tensor from this arena that nothing reads again (its chunk stays mapped)."""
        _madvise(*_whole_pages(t), _MADV_DONTNEED)
