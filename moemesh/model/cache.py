"""The MLA KV cache of one request on one node.

Per layer it keeps one row per token: the normalized latent (kv_lora_rank) followed by the roped key
(qk_rope_head_dim), in the compute dtype. Writes happen at explicit positions, so rolling back after
rejected speculative tokens is `truncate(n)`: later rows are simply overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class KVCache:
    def __init__(self, backend: Any, width: int, capacity: int = 256):
        self.backend = backend
        self.width = width  # kv_lora_rank + qk_rope_head_dim
        self.capacity = capacity  # rows allocated for a layer's first write
        self.length = 0  # tokens whose rows are valid in every layer this node holds
        self.buffers: dict[int, Any] = {}  # layer -> [capacity, width]

    def buffer(self, layer: int, end: int) -> Any:
        """The layer's buffer, grown (rows before `end` kept) to hold at least `end` rows."""
        buffer = self.buffers.get(layer)
        if buffer is None or buffer.shape[0] < end:
            size = max(end, self.capacity if buffer is None else 2 * buffer.shape[0])
            grown = self.backend.empty(size, self.width)
            if buffer is not None:
                grown[: buffer.shape[0]] = buffer
            self.buffers[layer] = buffer = grown
        return buffer

    def store(self, layer: int, start: int, rows: Any) -> Any:
        """Write rows for positions start.. and return the valid rows [start + len(rows), width]."""
        end = start + rows.shape[0]
        buffer = self.buffer(layer, end)
        buffer[start:end] = rows
        return buffer[:end]

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (speculative-decoding rollback)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        """Bytes of the valid rows (what the cache holds, not what was allocated ahead)."""
        return self.length * self.width * self.backend.element_size * len(self.buffers)


@dataclass
class Segment:
    """One request's tokens in a forward step: `length` new tokens at positions start.. ."""
    cache: KVCache
    start: int
    length: int
