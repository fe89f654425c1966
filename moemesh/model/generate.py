"""One request's life, the same on one machine and on a cluster: check the prompt, sample, stream, stop
(EOS, a stop string, max_new_tokens, the context), and time it.

A driver feeds a request's unfed tokens to the model, samples from the logits and hands the sampled tokens
to `Request.add`, which keeps them up to the one that ends the request and updates its stats; the driver
streams what it kept. `generate_tokens` is the driver over a `step(ids, start) -> logits of the last
position` (one machine); the coordinator's scheduler drives many requests in one batched step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

StepFn = Callable[[list[int], int], np.ndarray]  # (new token ids, position of the first) -> logits [vocab]


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < z.size:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if s.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, s.top_p) + 1)]  # smallest prefix reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # from submission to the first new token
    decode_s: float = 0.0  # from the first new token to the last
    finish_reason: str = ""  # "stop" (EOS or stop string) or "length"; "" while running

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill; each later one costs one decode step.
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0


class TextStream:
    """Turns tokens into text deltas, holding back what might be the start of a stop string and
    incomplete UTF-8, and says when a stop string has appeared (the text stops before it)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None):
        self.decode = decode
        self.stop = [s for s in stop or [] if s]
        self.ids: list[int] = []
        self.text = ""  # full text so far, up to (not including) any stop string
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        safe = len(text)
        for n in range(min(hold, len(text)), 0, -1):  # keep back a tail that a stop string could start with
            if any(s.startswith(text[-n:]) for s in self.stop):
                safe = len(text) - n
                break
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


def check_ids(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def check_prompt(prompt: list[int], vocab_size: int, context: int, stop: list[str] | None = None,
                 tokenizer: bool = True) -> None:
    """Raise ValueError saying what is wrong with a prompt to generate from: it is empty, leaves no room in
    the context for a new token, holds an id outside the vocabulary, or comes with stop strings but no
    tokenizer to find them with."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context:
        raise ValueError(f"the prompt has {len(prompt)} tokens; this model's context is {context} positions")
    check_ids(prompt, vocab_size)
    if stop and not tokenizer:
        raise ValueError("stop strings need a tokenizer")


def token_rows(batch, vocab_size: int, context: int) -> list[list[int]]:
    """A batch for full-sequence logits (a list of lists, or a 2-D integer array or tensor) as lists of ints;
    ValueError unless the rows are non-empty, of equal length, within the context and the vocabulary."""
    rows = [list(map(int, r)) for r in (batch.tolist() if hasattr(batch, "tolist") else batch)]
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("logits() takes a non-empty batch of equal-length, non-empty token sequences")
    if len(rows[0]) > context:
        raise ValueError(f"sequences of {len(rows[0])} tokens exceed the context ({context})")
    check_ids([t for r in rows for t in r], vocab_size)
    return rows


@dataclass
class Request:
    """One generation request — what was asked — and its progress: the tokens generated, the positions the
    model's caches hold, the stats."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: tuple[int, ...] = ()
    stop: list[str] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # positions the model's KV caches hold for this request
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: bool = False  # its consumer went away
    context: int = 0  # positions the model holds (set by start)
    rng: np.random.Generator | None = None
    text: TextStream | None = None  # decoded text, to find stop strings in
    submitted: float = 0.0  # perf_counter() at start
    first_token_at: float = 0.0

    def start(self, vocab_size: int, context: int, decode: Callable[[list[int]], str] | None = None) -> Request:
        """Check the prompt against the model (ValueError) and start the clock."""
        check_prompt(self.prompt, vocab_size, context, self.stop, decode is not None)
        self.context = context
        self.rng = np.random.default_rng(self.sampling.seed)
        self.text = TextStream(decode, self.stop) if self.stop else None
        self.stats.prompt_tokens = len(self.prompt)
        if self.max_new_tokens < 1:
            self.stats.finish_reason = "length"
        self.submitted = time.perf_counter()
        return self

    @property
    def finished(self) -> bool:
        return bool(self.stats.finish_reason)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def unfed(self) -> list[int]:
        """The tokens the model's caches do not hold yet (the prompt and tokens so far after a replay)."""
        if self.fed >= len(self.prompt):
            return self.generated[self.fed - len(self.prompt) :]
        return self.prompt[self.fed :] + self.generated

    def add(self, tokens: list[int], now: float | None = None) -> list[int]:
        """Append sampled tokens up to the one that ends the request (an EOS, the token completing a stop
        string, max_new_tokens, the context) and update the stats; returns the tokens kept, to stream."""
        now = time.perf_counter() if now is None else now
        kept = []
        for token in tokens:
            if self.finished:
                break
            self.generated.append(token)
            kept.append(token)
            stop = token in self.eos_ids
            if not stop and self.text is not None:
                self.text.add(token)
                stop = self.text.stopped
            if stop:
                self.stats.finish_reason = "stop"
            elif len(self.generated) >= self.max_new_tokens or self.length >= self.context:
                self.stats.finish_reason = "length"
        if kept:
            if not self.first_token_at:
                self.first_token_at = now
                self.stats.prefill_s = now - self.submitted
            self.stats.new_tokens = len(self.generated)
            self.stats.decode_s = now - self.first_token_at
        return kept


def generate_tokens(step: StepFn, req: Request) -> Iterator[int]:
    """Run a started request to its end on `step`, one token per step, yielding each new token id as it is
    kept (an EOS, or the token completing a stop string, included)."""
    while not req.finished:
        ids = req.unfed
        logits = step(ids, req.fed)
        req.fed += len(ids)
        yield from req.add([sample(logits, req.sampling, req.rng)])
