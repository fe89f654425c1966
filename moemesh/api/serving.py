"""What the HTTP API serves from, the same for a cluster and for one machine: a `Scheduler` (continuous
batching, `moemesh.coordinator.scheduler`) with the model's tokenizer and sizes, whether it can serve now,
and its status (`pb.Status`, as `coordinator status` shows it) and routing counts.

`from_coordinator` wraps a running coordinator. `LocalServing` runs the whole model on this machine behind
the same scheduler: its "ring" is one call of the model's layers over the step, with a KV cache per request
(`worker.shard.Shard`), so requests batch together as they do on a cluster."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..coordinator.scheduler import Scheduler
from ..model.generate import speculation
from ..model.tokenizer import Tokenizer
from ..spec.config import ModelArgs
from ..spec.routing import RoutingStats
from ..transport import moemesh_pb2 as pb
from ..transport.wire import new_node_id, node_info
from ..worker.shard import Shard

if TYPE_CHECKING:
    from ..coordinator.server import Coordinator
    from ..model.engine import Engine


@dataclass
class Served:
    name: str  # the model's name in the API: its directory's
    scheduler: Scheduler
    tokenizer: Tokenizer | None
    args: ModelArgs
    eos: tuple[int, ...]
    speculative: bool  # requests' default: draft with the MTP module
    ready: asyncio.Event  # set while it can serve
    ready_timeout: float  # how long a request waits for `ready`
    waiting_for: Callable[[], str]  # what it waits for before it serves, in words
    status: Callable[[], Awaitable[pb.Status]]
    routing: Callable[[], Awaitable[RoutingStats]]

    @property
    def context(self) -> int:
        return self.args.max_position_embeddings


def from_coordinator(c: Coordinator) -> Served:
    """The coordinator's scheduler, status (the gRPC Cluster answer) and routing counts (merged from the
    workers)."""
    return Served(name=Path(c.opts.model).resolve().name, scheduler=c.scheduler, tokenizer=c.tokenizer, args=c.args,
                  eos=c.eos, speculative=c.speculative, ready=c.ready, ready_timeout=c.opts.ready_timeout,
                  waiting_for=c.waiting_for, status=lambda: c.service.Cluster(pb.Empty(), None),
                  routing=lambda: c.loader.routing_stats(c.members.ready()))


class LocalServing:
    """The whole model on this machine, batched by a Scheduler; `run()` is its step loop."""

    def __init__(self, engine: Engine, path: Path, speculative: str = "auto", ready_timeout: float = 30.0):
        self.engine = engine
        self.shard = Shard(engine.model)
        self.scheduler = Scheduler(engine.model, self._forward, self._replan)
        self.busy_ms: deque[float] = deque(maxlen=200)  # the model's time per step
        self.info = node_info(new_node_id(), "local", "", 0, backend=engine.backend.name,
                              device=str(engine.backend.device))
        ready = asyncio.Event()
        ready.set()
        self.served = Served(name=Path(path).resolve().name, scheduler=self.scheduler, tokenizer=engine.tokenizer,
                             args=engine.args, eos=engine.eos_ids,
                             speculative=speculation(speculative, bool(engine.model.mtp)), ready=ready,
                             ready_timeout=ready_timeout, waiting_for=lambda: "", status=self.status,
                             routing=self.routing)

    async def _forward(self, segments: list[tuple[str, int, int]], x: torch.Tensor, free: list[str]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        y = await loop.run_in_executor(self.scheduler.compute, self.shard.step, segments, x, free)
        if segments:
            self.busy_ms.append(1000 * (time.perf_counter() - start))
        return y

    async def _replan(self, reason: str) -> None:
        raise RuntimeError(f"one machine has nothing to re-plan on ({reason})")

    async def run(self) -> None:
        await self.scheduler.run()

    async def status(self) -> pb.Status:
        e, s = self.engine, self.scheduler
        busy = statistics.median(self.busy_ms) if self.busy_ms else 0.0
        node = pb.NodeStatus(info=self.info, state="serving", weight_bytes=e.weight_bytes, kv_bytes=self.shard.kv_bytes,
                             layers=e.model.layers, experts=sum(len(b.ffn.experts) for b in e.model.blocks.values()
                                                                if hasattr(b.ffn, "experts")), busy_ms=busy)
        return pb.Status(coordinator=self.info, model=self.served.name, nodes=[node], tokens_per_s=s.tokens_per_s(),
                         active_requests=len(s.active), state="ready", step_ms_median=busy,
                         speculative=self.served.speculative, draft_acceptance=s.served.acceptance_rate,
                         tokens_per_trip=s.served.tokens_per_step)

    async def routing(self) -> RoutingStats:
        # On the model's thread: the counts change as steps run.
        return await asyncio.get_running_loop().run_in_executor(self.scheduler.compute, self.engine.routing_stats)
