"""Speculative decoding with the checkpoint's MTP module as the draft model, on the head node.

Each step the main model verifies a request's last token and its draft in one pass (`Request.accept`:
speculative sampling, exact for greedy and sampling); the MTP module then drafts the next token from the
main model's final hidden state at the last verified position and the token after it. The MTP layer keeps
its own KV cache per request with rows for verified positions only, so a rejected draft never reaches it;
the main model's caches hold the rejected draft's row until the next step, which starts at the first
unverified position and so rolls them back (`model._open`), on every stage of a cluster alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cache import KVCache, Segment
from .generate import Request
from .model import Transformer


class MtpDrafter:
    """Drafts the next token of speculating requests with MTP layer 0, many requests in one MTP step."""

    def __init__(self, model: Transformer):
        self.model = model
        self.caches: dict[str, KVCache] = {}  # request id -> the MTP layer's KV cache

    def draft(self, hidden: Any, runs: list[tuple[Request, int, int]]) -> None:
        """After a step whose tokens were accepted: `hidden` are its normed final hidden states, `runs` each
        speculating request still running, with the position of its first token in the step and that token's
        row in `hidden`. Writes the MTP rows of the positions the step verified (each sees the token after it)
        and, for a request fed up to its last token, sets its draft from the last row's MTP logits."""
        segments, rows, next_ids, drafting = [], [], [], []
        for req, start, row in runs:
            n = req.fed - start
            segments.append(Segment(self.cache(req.id), start, n))
            rows += range(row, row + n)
            next_ids += req.tokens(start + 1, req.fed + 1)
            if req.fed == req.length - 1:  # not a prompt chunk with more to come
                drafting.append((req, len(rows) - 1))
        if not segments:
            return
        b = self.model.backend
        _, logits = self.model.mtp_logits(hidden[b.tokens(rows)], next_ids, segments, rows=[i for _, i in drafting])
        for (req, _), row in zip(drafting, b.to_numpy(logits)):
            req.propose(row)

    def cache(self, request_id: str) -> KVCache:
        cache = self.caches.get(request_id)
        if cache is None:
            cache = self.caches[request_id] = KVCache(self.model.backend, self.model.args.kv_cache_width)
        return cache

    def free(self, request_id: str) -> None:
        self.caches.pop(request_id, None)


class LocalSpeculation:
    """One speculating request on this machine, as `generate_tokens`' step and draft: `step` runs the main
    model over the pending tokens and returns the logits at the last token and at each draft, keeping the
    normed final hidden states that `draft` hands to the MTP module."""

    def __init__(self, model: Transformer, cache: KVCache, req: Request):
        self.model, self.cache, self.req = model, cache, req
        self.drafter = MtpDrafter(model)
        self.hidden: Any = None
        self.start = 0

    def step(self, ids: list[int], start: int) -> np.ndarray:
        m = self.model
        self.hidden = m.final_norm(m.forward(m.embed(ids), [Segment(self.cache, start, len(ids))]))
        self.start = start
        return m.backend.to_numpy(m.lm_logits(self.hidden[-1 - len(self.req.draft) :]))

    def draft(self, req: Request) -> None:
        self.drafter.draft(self.hidden, [(req, self.start, 0)])
