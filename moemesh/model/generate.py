"""Token generation over any forward function: sampling, EOS and stop strings, streaming.

`generate_tokens` drives a `step(ids, start) -> logits of the last position`, so the same loop serves a
model on this machine and one spread over a cluster.
"""

from __future__ import annotations

import time
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
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string) or "length"

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


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: tuple[int, ...] = ()
    stop: list[str] | None = None


def generate_tokens(step: StepFn, req: Request, max_positions: int,
                    decode: Callable[[list[int]], str] | None = None,
                    stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids: stops after an EOS token (yielded), a stop string (the token completing it is
    yielded), max_new_tokens, or the model's context length."""
    if not req.prompt:
        raise ValueError("the prompt is empty")
    if len(req.prompt) >= max_positions:
        raise ValueError(f"the prompt has {len(req.prompt)} tokens; this model's context is {max_positions} positions")
    if req.stop and decode is None:
        raise ValueError("stop strings need a tokenizer")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.finish_reason = len(req.prompt), "length"
    rng = np.random.default_rng(req.sampling.seed)
    text = TextStream(decode, req.stop) if req.stop else None
    t0 = time.perf_counter()
    logits = step(req.prompt, 0)
    stats.prefill_s = time.perf_counter() - t0
    position = len(req.prompt)
    for i in range(req.max_new_tokens):
        token = sample(logits, req.sampling, rng)
        stats.new_tokens = i + 1
        yield token
        if token in req.eos_ids:
            stats.finish_reason = "stop"
            return
        if text is not None:
            text.add(token)
            if text.stopped:
                stats.finish_reason = "stop"
                return
        if i + 1 == req.max_new_tokens or position + 1 >= max_positions:
            return
        t0 = time.perf_counter()
        logits = step([token], position)
        stats.decode_s += time.perf_counter() - t0  # model time only, not the consumer's
        position += 1
