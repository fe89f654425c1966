"""A whole model on this machine: `moemesh.load(DIR)` returns an `Engine`.

The public inference interface (`logits`, `generate`, `stream`, `tokenizer`) is the one the cluster
client serves too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..kernels import get_backend
from .cache import KVCache, Segment
from .checkpoint import Checkpoint
from ..spec.config import ModelArgs
from .generate import GenerationStats, Request, Sampling, generate_tokens, speculation, token_rows
from .model import Progress, Transformer
from .speculative import LocalSpeculation
from ..spec.routing import RoutingStats
from .tokenizer import Tokenizer


def eos_ids(path: Path, args: ModelArgs) -> tuple[int, ...]:
    """EOS ids as transformers uses them: generation_config.json's when present, else config.json's."""
    gen = path / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        if value is not None:
            return tuple(value) if isinstance(value, list) else (int(value),)
    return args.eos_token_ids


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, eos: tuple[int, ...]):
        self.model = model
        self.args = model.args
        self.backend = model.backend
        self.tokenizer = tokenizer
        self.eos_ids = eos
        self.last_stats = GenerationStats()

    @classmethod
    def load(cls, path: str | Path, backend: str = "torch", dtype: str = "bfloat16", device: str = "cpu",
             progress: Progress | None = None) -> Engine:
        ckpt = Checkpoint(path)
        model = Transformer.load(ckpt, get_backend(backend, ckpt.args, dtype=dtype, device=device), progress=progress)
        return cls(model, Tokenizer.from_dir(path), eos_ids(Path(path), ckpt.args))

    # ---- sizes
    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return self.args.kv_cache_bytes_per_token(self.backend.element_size)

    def new_cache(self) -> KVCache:
        return KVCache(self.backend, self.args.kv_cache_width)

    # ---- inference
    def logits(self, batch) -> torch.Tensor:
        """Full-sequence logits [batch, T, vocab] (float32, CPU) for equal-length token sequences
        (a list of lists or a 2-D integer tensor/array)."""
        rows = token_rows(batch, self.args.vocab_size, self.args.max_position_embeddings)
        flat = [t for r in rows for t in r]
        segments = [Segment(self.new_cache(), 0, len(r)) for r in rows]
        _, logits = self.model.head(self.model.forward(self.model.embed(flat), segments))
        return torch.from_numpy(self.backend.to_numpy(logits)).view(len(rows), len(rows[0]), -1)

    def step_fn(self, cache: KVCache):
        """A `generate_tokens` step over one request's cache, without drafts: logits of the last new position."""
        def step(ids: list[int], start: int) -> np.ndarray:
            x = self.model.forward(self.model.embed(ids), [Segment(cache, start, len(ids))])
            _, logits = self.model.head(x[-1:])
            return self.backend.to_numpy(logits)[0]
        return step

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: list[str] | None = None, speculative: str | None = "auto") -> Iterator[int]:
        """Yield new token ids one by one (EOS included when reached). `speculative`: "mtp" drafts each next
        token with the MTP module and verifies it in the following step (exact: the output is the model's),
        None or "off" does not, "auto" does where the checkpoint has MTP weights."""
        req = Request([int(t) for t in prompt_ids], max_new_tokens, Sampling(temperature, top_p, top_k, seed),
                      self.eos_ids, stop, speculation(speculative, bool(self.model.mtp)))
        self.last_stats = req.stats
        req.start(self.args.vocab_size, self.args.max_position_embeddings,
                  self.tokenizer.decode if self.tokenizer else None)
        if not req.speculative:
            yield from generate_tokens(self.step_fn(self.new_cache()), req)
            return
        run = LocalSpeculation(self.model, self.new_cache(), req)
        yield from generate_tokens(run.step, req, run.draft)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 256, **kwargs) -> list[int]:
        """The new token ids for one prompt; stops early only at EOS or a stop string (keywords: `stream`'s)."""
        return list(self.stream(prompt_ids, max_new_tokens, **kwargs))

    def routing_stats(self) -> RoutingStats:
        return self.model.routing_stats()
