"""One request's life, the same on one machine and on a cluster: check the prompt, sample, stream, stop
(EOS, a stop string, max_new_tokens, the context), and time it.

A driver feeds a request's pending tokens to the model (the unfed ones, then any drafts) and hands the logits
to `Request.accept`, which samples the next token (or verifies the drafts: speculative sampling, `verify`)
and keeps the tokens up to the one that ends the request (`Request.add`), updating its stats; the driver
streams what it kept. `generate_tokens` is the driver over a `step(ids, start) -> logits` (one machine); the
coordinator's scheduler drives many requests in one batched step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

# (new token ids, position of the first) -> logits of the last position [vocab], or of the last 1 + drafts
# positions [rows, vocab] when the ids end with drafts
StepFn = Callable[[list[int], int], np.ndarray]
DraftFn = Callable[["Request"], None]  # sets a request's drafts for its next step (`Request.propose`)
SPECULATIVE = ("auto", "mtp", "off")


def speculation(choice: str | None, available: bool) -> bool:
    """Whether a request speculates with the MTP module: "mtp" (ValueError where the model has none), "off" or
    None, or "auto": where it has one. The output is the model's either way."""
    if choice not in (*SPECULATIVE, None):
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)} (or None), got {choice!r}")
    if choice == "mtp" and not available:
        raise ValueError("speculative='mtp' needs MTP weights, and this checkpoint has none loaded")
    return available and choice in ("mtp", "auto")


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # NaN fails this too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The distribution a token is drawn from (float64): softmax(logits / temperature) cut to the top_k tokens, then
    to the smallest set reaching top_p, renormalized; greedy (temperature 0) puts all of it on the argmax."""
    if s.temperature == 0:
        p = np.zeros(logits.size)
        p[np.argmax(logits)] = 1.0
        return p
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
    return probs


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from the distribution p."""
    return int(rng.choice(p.size, p=p))


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token as `s` samples it: the argmax when greedy, else a draw from `probabilities`."""
    return int(np.argmax(logits)) if s.temperature == 0 else draw(probabilities(logits, s), rng)


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """max(0, p - q), normalized: what a rejected draft is replaced from, so that the token comes out distributed
    as p. Reached only where q puts more mass than p on the draft, so some token has p > q and the sum is > 0."""
    r = np.maximum(p - q, 0.0)
    return r / r.sum()


def verify(draft: list[int], draft_probs: list[np.ndarray], logits: np.ndarray, s: Sampling,
           rng: np.random.Generator) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): `logits` [1 + len(draft), vocab] are the
    model's at the token before each draft and after the last; `draft_probs` the distributions the drafts were
    drawn from. Draft i is kept with probability min(1, p(d)/q(d)), p and q after temperature/top-k/top-p; the
    first one rejected is replaced by a draw from `residual(p, q)`; when all are kept, one more token is sampled
    from the last row. Each token comes out distributed exactly as the model's own sample; greedy is the case
    where p and q are one-hot: a draft is kept where it is the argmax, else replaced by the argmax. Returns
    (drafts kept, the token after them)."""
    for i, (d, q) in enumerate(zip(draft, draft_probs)):
        p = probabilities(logits[i], s)
        if rng.random() * q[d] >= p[d]:  # rejected: u >= p(d)/q(d); q(d) > 0, d was drawn from q
            return i, draw(residual(p, q), rng)
    return len(draft), sample(logits[len(draft)], s, rng)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # from submission to the first new token
    decode_s: float = 0.0  # from the first new token to the last
    finish_reason: str = ""  # "stop" (EOS or stop string) or "length"; "" while running
    steps: int = 0  # forward steps (on a cluster: trips around the ring) that yielded tokens
    drafted: int = 0  # draft tokens verified (speculative decoding)
    accepted: int = 0  # of those, kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

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
    speculative: bool = False  # each step also carries a draft of the token after (the MTP module's)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # positions the model's KV caches hold verified tokens at for this request
    draft: list[int] = field(default_factory=list)  # drafts after the last token, for the next step to verify
    draft_probs: list[np.ndarray] = field(default_factory=list)  # the distribution each draft was drawn from
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

    def tokens(self, start: int, end: int) -> list[int]:
        """Its tokens (the prompt, then those generated) at positions start..end-1."""
        n = len(self.prompt)
        return self.prompt[start:end] + self.generated[max(start - n, 0) : max(end - n, 0)]

    @property
    def unfed(self) -> list[int]:
        """The tokens the model's caches do not hold yet (the prompt and tokens so far after a replay)."""
        return self.tokens(self.fed, self.length)

    @property
    def pending(self) -> list[int]:
        """What its next step feeds from position `fed`: the unfed tokens, then the drafts."""
        return self.unfed + self.draft

    def replay(self) -> None:
        """The model's caches were lost: feed everything again from position 0, drafting anew."""
        self.fed = 0
        self.draft, self.draft_probs = [], []

    def propose(self, logits: np.ndarray) -> None:
        """Draft the token after its last one from a draft model's logits, drawn as the request samples."""
        q = probabilities(logits, self.sampling)
        self.draft, self.draft_probs = [draw(q, self.rng)], [q]

    def accept(self, logits: np.ndarray, now: float | None = None) -> list[int]:
        """After a step that fed all of `pending`: `logits` are the model's at the last unfed token and at each
        draft ([1 + drafts, vocab]; [vocab] without drafts). Keeps the drafts `verify` accepts and one token
        more, moves `fed` past the positions that hold verified tokens (the caches' rows after them are
        overwritten by the next step), and adds the tokens; returns those kept (see `add`)."""
        kept, token = verify(self.draft, self.draft_probs, np.atleast_2d(logits), self.sampling, self.rng)
        tokens = self.draft[:kept] + [token]
        self.fed = self.length + kept
        self.stats.steps += 1
        self.stats.drafted += len(self.draft)
        self.stats.accepted += kept
        self.draft, self.draft_probs = [], []
        return self.add(tokens, now)

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


def generate_tokens(step: StepFn, req: Request, draft: DraftFn | None = None) -> Iterator[int]:
    """Run a started request to its end on `step`, yielding each new token id as it is kept. Each step feeds the
    request's pending tokens; with `draft`, which sets the drafts for the next step, those ride along and are
    verified (`Request.accept`)."""
    while not req.finished:
        logits = step(req.pending, req.fed)
        yield from req.accept(logits)
        if draft is not None and not req.finished:
            draft(req)
