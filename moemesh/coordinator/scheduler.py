"""Continuous batching on the head node: every step carries the next chunk of each request — a prompt
chunk, or the last sampled token — around the ring once; the head embeds, samples and streams.

When a worker is lost mid-generation the coordinator re-plans and the requests replay what they have
(prompt + tokens so far) from position 0 on the new ring: no request is dropped, and greedy output is
the same as without the failure.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.generate import GenerationStats, Sampling, TextStream, sample
from ..model.model import Transformer
from ..model.tokenizer import Tokenizer

STEP_TOKENS = 1024  # prompt tokens per step at most (longer prompts take several steps)


class StepFailed(RuntimeError):
    """A stage reported an error computing a step (the requests in it fail with this message)."""


class NodeLost(RuntimeError):
    """A stage stopped answering: the coordinator must re-plan before the next step."""


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str] | None
    out: asyncio.Queue  # ("token", id) | ("done", stats) | ("error", message)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # positions the ring's caches hold for this request
    rng: np.random.Generator | None = None
    text: TextStream | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    cancelled: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


# (segments: (request id, start, length), hidden [tokens, hidden], free) -> hidden after the last stage
Forward = Callable[[list[tuple[str, int, int]], torch.Tensor, list[str]], Awaitable[torch.Tensor]]


class Scheduler:
    def __init__(self, head: Transformer, tokenizer: Tokenizer | None, eos: tuple[int, ...], forward: Forward,
                 replan: Callable[[str], Awaitable[None]]):
        self.head = head
        self.tokenizer = tokenizer
        self.eos = eos
        self.forward = forward
        self.replan = replan
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="head")
        self.active: list[Request] = []
        self.free: list[str] = []  # finished requests whose caches the next step drops
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one step around the ring at a time
        self.recent: list[tuple[float, int]] = []  # (time, tokens generated) per step, for tokens/s

    def submit(self, req: Request) -> None:
        limit = self.head.args.max_position_embeddings
        if not req.prompt:
            raise ValueError("the prompt is empty")
        if len(req.prompt) >= limit:
            raise ValueError(f"the prompt has {len(req.prompt)} tokens; this model's context is {limit} positions")
        bad = [t for t in req.prompt if not 0 <= t < self.head.args.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.head.args.vocab_size - 1})")
        if req.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        req.rng = np.random.default_rng(req.sampling.seed)
        req.text = TextStream(self.tokenizer.decode, req.stop) if req.stop else None
        req.stats.prompt_tokens = len(req.prompt)
        self.active.append(req)
        self.wake.set()

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        self.recent = [(t, n) for t, n in self.recent if now - t < window]
        if len(self.recent) < 2:
            return 0.0
        return sum(n for _, n in self.recent[1:]) / max(self.recent[-1][0] - self.recent[0][0], 1e-9)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for r in [r for r in self.active if r.cancelled]:  # the client went away
                self.active.remove(r)
                self.free.append(r.id)
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                continue
            async with self.lock:
                batch = self._plan_step()
                ids = [t for r, start, n in batch for t in r.tokens[start : start + n]]
                segments = [(r.id, start, n) for r, start, n in batch]
                free, self.free = self.free, []
                try:
                    x = await loop.run_in_executor(self.compute, self.head.embed, ids)
                    hidden = await self.forward(segments, x, free)
                except NodeLost as e:
                    await self._recover(str(e))
                    continue
                except StepFailed as e:
                    for r, _, _ in batch:
                        self._finish(r, error=str(e))
                    continue
                await self._sample(batch, hidden)

    def _plan_step(self) -> list[tuple[Request, int, int]]:
        """(request, first position, tokens) for this step: decode tokens first, then prompt chunks."""
        batch, budget = [], STEP_TOKENS
        for r in sorted(self.active, key=lambda r: len(r.tokens) - r.fed):
            todo = len(r.tokens) - r.fed
            n = 1 if todo == 1 else min(todo, budget)  # a decode token always rides along
            if n > 0:
                batch.append((r, r.fed, n))
                budget -= n
        return batch

    async def _sample(self, batch: list[tuple[Request, int, int]], hidden: torch.Tensor) -> None:
        """Logits of each request whose tokens are all in now; sample, stream, finish."""
        ends, offset = [], 0
        for r, start, n in batch:
            r.fed = start + n
            offset += n
            if r.fed == len(r.tokens):
                ends.append((r, offset - 1))
        if not ends:
            return
        rows = hidden[torch.tensor([i for _, i in ends])]
        logits = await asyncio.get_running_loop().run_in_executor(
            self.compute, lambda: self.head.backend.to_numpy(self.head.head(rows)[1]))
        now = time.perf_counter()
        for (r, _), row in zip(ends, logits):
            token = sample(row, r.sampling, r.rng)
            r.generated.append(token)
            r.stats.new_tokens = len(r.generated)
            if r.first_token_at == 0.0:
                r.first_token_at = now
                r.stats.prefill_s = now - r.started
            r.stats.decode_s = now - r.first_token_at
            r.out.put_nowait(("token", token))
            stop = token in self.eos
            if not stop and r.text is not None:
                r.text.add(token)
                stop = r.text.stopped
            if stop:
                r.stats.finish_reason = "stop"
            if stop or len(r.generated) >= r.max_new_tokens or len(r.tokens) >= self.head.args.max_position_embeddings:
                r.stats.finish_reason = r.stats.finish_reason or "length"
                self._finish(r)
        self.recent.append((now, len(ends)))

    def _finish(self, r: Request, error: str | None = None) -> None:
        if r in self.active:
            self.active.remove(r)
        self.free.append(r.id)
        r.out.put_nowait(("error", error) if error else ("done", r.stats))

    async def _recover(self, reason: str) -> None:
        """Re-plan around the lost node, then replay every active request from position 0."""
        try:
            await self.replan(reason)
        except Exception as e:  # nothing left to run on: the requests fail with the reason
            for r in list(self.active):
                self._finish(r, error=f"lost a worker ({reason}) and could not re-plan: {e}")
            return
        self.free.clear()  # the new shards hold no caches
        for r in self.active:
            r.fed = 0

    async def exclusive(self, fn: Callable[[], Awaitable]) -> object:
        """Run `fn` between steps (full-sequence logits use the ring too)."""
        async with self.lock:
            return await fn()
