"""Continuous batching on the head node: every step carries the next chunk of each request — a prompt
chunk, or the last sampled token and, for a request that speculates, the MTP module's draft after it —
around the ring once; the head embeds, samples or verifies, drafts and streams. Each request lives as on
one machine (`moemesh.model.generate.Request`: sample or verify, keep, stop, stats). A request whose draft
was rejected starts its next segment at the first unverified position, and every stage rolls its cache
back to there before writing (docs/cluster.md, The step).

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

import numpy as np
import torch

from ..model.generate import GenerationStats, Request
from ..model.model import Transformer
from ..model.speculative import MtpDrafter

STEP_TOKENS = 1024  # prompt tokens per step at most (longer prompts take several steps)


class StepFailed(RuntimeError):
    """A stage reported an error computing a step (the requests in it fail with this message)."""


class NodeLost(RuntimeError):
    """A stage stopped answering: the coordinator must re-plan before the next step."""


# (segments: (request id, start, length), hidden [tokens, hidden], free) -> hidden after the last stage
Forward = Callable[[list[tuple[str, int, int]], torch.Tensor, list[str]], Awaitable[torch.Tensor]]
Out = asyncio.Queue  # ("token", id) | ("done", GenerationStats) | ("error", message)


class Scheduler:
    def __init__(self, head: Transformer, forward: Forward, replan: Callable[[str], Awaitable[None]]):
        self.head = head
        self.forward = forward
        self.replan = replan  # loads new shards and calls reset_caches, or raises
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="head")
        self.active: list[Request] = []
        self.outs: dict[str, Out] = {}  # request id -> its stream
        self.free: list[str] = []  # finished requests whose caches the next step drops
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one step around the ring at a time
        self.drafter = MtpDrafter(head)
        self.recent: list[tuple[float, int]] = []  # (time, tokens generated) per step, for tokens/s
        self.served = GenerationStats()  # every request's steps, drafts and tokens since start

    def submit(self, req: Request) -> Out:
        """Queue a started request; its tokens, then ("done", stats) or ("error", message), arrive on the
        queue returned."""
        out = self.outs[req.id] = asyncio.Queue()
        self.active.append(req)
        self.wake.set()
        return out

    def cancel(self, req: Request) -> None:
        """Its consumer went away: the request is dropped before the next step."""
        req.cancelled = True
        self.wake.set()

    def reset_caches(self) -> None:
        """The ring's shards are new and hold no caches: nothing to free, and every active request replays
        from position 0."""
        self.free.clear()
        for r in self.active:
            r.replay()

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        self.recent = [(t, n) for t, n in self.recent if now - t < window]
        if len(self.recent) < 2:
            return 0.0
        return sum(n for _, n in self.recent[1:]) / max(self.recent[-1][0] - self.recent[0][0], 1e-9)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for r in [r for r in self.active if r.cancelled]:
                self._drop(r)
            if not self.active:
                if self.free:  # requests that ended or were cancelled: their caches go now, not with the next request
                    await self._free_now()
                    continue
                self.wake.clear()
                await self.wake.wait()
                continue
            async with self.lock:
                batch = self._plan_step()
                ids = [t for r, n in batch for t in r.pending[:n]]
                segments = [(r.id, r.fed, n) for r, n in batch]
                free, self.free = self.free, []
                try:
                    x = await loop.run_in_executor(self.compute, self.head.embed, ids)
                    hidden = await self.forward(segments, x, free)
                except NodeLost as e:
                    await self._recover(str(e))
                    continue
                except StepFailed as e:
                    for r, _ in batch:
                        self._finish(r, error=str(e))
                    continue
                await self._sample(batch, hidden)

    async def _free_now(self) -> None:
        """A step with no tokens, carrying only the requests whose caches every stage drops."""
        async with self.lock:
            free, self.free = self.free, []
            x = await asyncio.get_running_loop().run_in_executor(self.compute, self.head.embed, [])
            try:
                await self.forward([], x, free)
            except (NodeLost, StepFailed):
                pass  # the next plan's shards start without caches

    def _plan_step(self) -> list[tuple[Request, int]]:
        """(request, tokens from its first unfed position) for this step: decode tokens first, then prompt
        chunks."""
        batch, budget = [], STEP_TOKENS
        for r in sorted(self.active, key=lambda r: len(r.pending)):
            todo = r.length - r.fed
            n = len(r.pending) if todo == 1 else min(todo, budget)  # a decode token (and its draft) always rides
            if n > 0:
                batch.append((r, n))
                budget -= n
        return batch

    async def _sample(self, batch: list[tuple[Request, int]], hidden: torch.Tensor) -> None:
        """Each request's new tokens (and next draft) from the step's hidden states; stream, finish."""
        kept = await asyncio.get_running_loop().run_in_executor(self.compute, self._tokens, batch, hidden)
        now = time.perf_counter()
        for (r, _), tokens in zip(batch, kept):
            for token in tokens:
                self.outs[r.id].put_nowait(("token", token))
            if r.finished:
                self._finish(r)
        self.recent.append((now, sum(map(len, kept))))

    def _tokens(self, batch: list[tuple[Request, int]], hidden: torch.Tensor) -> list[list[int]]:
        """On the head's thread: logits at the last token and each draft of every request whose pending tokens
        are all in, its tokens (`Request.accept`), then the MTP drafts. Returns the tokens each request kept
        (none for a prompt chunk with more to come)."""
        h = self.head.final_norm(hidden)
        rows, offset = [], 0
        for r, n in batch:
            if n == len(r.pending):
                rows += range(offset + n - 1 - len(r.draft), offset + n)
            offset += n
        b = self.head.backend
        logits = b.to_numpy(self.head.lm_logits(h[b.tokens(rows)])) if rows else None
        kept, runs, at, offset = [], [], 0, 0
        for r, n in batch:
            start, k = r.fed, 1 + len(r.draft)
            if n == len(r.pending):
                kept.append(self._accept(r, logits[at : at + k]))
                at += k
            else:
                r.fed += n
                kept.append([])
            if r.speculative and not r.finished:
                runs.append((r, start, offset))
            offset += n
        self.drafter.draft(h, runs)
        return kept

    def _accept(self, r: Request, logits: np.ndarray) -> list[int]:
        """`Request.accept`, counted into `served`."""
        drafted, accepted = len(r.draft), r.stats.accepted
        tokens = r.accept(logits)
        s = self.served
        s.steps, s.drafted, s.new_tokens = s.steps + 1, s.drafted + drafted, s.new_tokens + len(tokens)
        s.accepted += r.stats.accepted - accepted
        return tokens

    def _drop(self, r: Request) -> Out:
        self.active.remove(r)
        self.free.append(r.id)
        self.drafter.free(r.id)
        return self.outs.pop(r.id)

    def _finish(self, r: Request, error: str | None = None) -> None:
        self._drop(r).put_nowait(("error", error) if error else ("done", r.stats))

    async def _recover(self, reason: str) -> None:
        """Re-plan around the lost node (the requests then replay from position 0); with nothing left to
        run on, the requests fail with the reason."""
        try:
            await self.replan(reason)
        except Exception as e:
            for r in list(self.active):
                self._finish(r, error=f"lost a worker ({reason}) and could not re-plan: {e}")

    async def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Full-sequence logits [batch, T, vocab] (float32, CPU) of equal-length rows, between steps; after a
        lost node, re-plans and tries once more."""
        loop = asyncio.get_running_loop()
        key = uuid.uuid4().hex[:8]
        ids = [f"logits-{key}-{i}" for i in range(len(rows))]
        async with self.lock:
            x = await loop.run_in_executor(self.compute, self.head.embed, [t for r in rows for t in r])
            for attempt in range(2):
                free, self.free = self.free, []
                try:
                    hidden = await self.forward([(r, 0, len(rows[0])) for r in ids], x, free)
                    break
                except NodeLost as e:
                    if attempt:
                        raise
                    await self.replan(str(e))
            self.free.extend(ids)
            logits = await loop.run_in_executor(self.compute, lambda: self.head.head(hidden)[1].float().cpu())
        return logits.view(len(rows), len(rows[0]), -1)

    async def exclusive(self, fn: Callable[[], Awaitable]) -> object:
        """Run `fn` between steps (re-planning uses the ring too)."""
        async with self.lock:
            return await fn()
