"""The coordinator's end of the ring: each step goes to the first stage over a persistent stream and comes
back from the last through the Forward handler. Its timing never compares two machines' clocks: each node
reports how long it held the step (its compute, on its own clock), and the links share what is left of the
round trip measured here."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import deque

import grpc
import torch

from ..transport import moemesh_pb2 as pb
from ..transport import moemesh_pb2_grpc as rpc
from ..transport.pipeline import StepStream
from ..transport.wire import tensor_from, tensor_msg
from .scheduler import NodeLost, StepFailed


def link_s(round_trip_s: float, busy_s: list[float]) -> float:
    """Seconds per hop of one step: its round trip less the nodes' compute, over the hops (one more than the
    nodes: coordinator -> first, ..., last -> coordinator)."""
    return max(round_trip_s - sum(busy_s), 0.0) / (len(busy_s) + 1)


def _p99(values) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


class StepTimes:
    """Recent steps: link time per hop, round trip, and each node's compute."""

    def __init__(self, keep: int = 2000, keep_per_node: int = 200):
        self.hop_ms: deque[float] = deque(maxlen=keep)
        self.step_ms: deque[float] = deque(maxlen=keep)
        self.busy: dict[str, deque[float]] = {}  # node id -> compute per step, ms
        self.keep_per_node = keep_per_node

    def record(self, round_trip_s: float, hops: list[pb.Hop]) -> None:
        self.step_ms.append(1000 * round_trip_s)
        self.hop_ms.append(1000 * link_s(round_trip_s, [h.busy_s for h in hops]))
        for h in hops:
            self.busy.setdefault(h.node_id, deque(maxlen=self.keep_per_node)).append(1000 * h.busy_s)

    def hop_ms_median(self) -> float:
        return statistics.median(self.hop_ms) if self.hop_ms else 0.0

    def hop_ms_p99(self) -> float:
        return _p99(self.hop_ms)

    def step_ms_median(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else 0.0

    def busy_ms(self, node_id: str) -> float:
        busy = self.busy.get(node_id)
        return statistics.median(busy) if busy else 0.0


class Ring(rpc.PipelineServicer):
    def __init__(self, device: torch.device | str, step_timeout: float):
        self.device = device
        self.step_timeout = step_timeout
        self.stream: StepStream | None = None
        self.broken: str | None = None  # why no step may go out, until the next connect
        self.pending: dict[int, asyncio.Future] = {}
        self.step_ids = itertools.count(1)
        self.times = StepTimes()

    async def connect(self, first: str) -> None:
        """Send steps to `first` (a new plan's first stage) from now on."""
        await self.close()
        self.stream = StepStream(first)
        self.broken = None

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()
            self.stream = None

    def fail(self, reason: str) -> None:
        """A node of the ring is gone: the steps in flight and any later one fail with NodeLost."""
        self.broken = reason
        for future in self.pending.values():
            if not future.done():
                future.set_exception(NodeLost(reason))
        self.pending.clear()

    async def forward(self, segments: list[tuple[str, int, int]], x: torch.Tensor, free: list[str]) -> torch.Tensor:
        """One step around the ring: the hidden states after the last stage."""
        if self.stream is None or self.broken:
            raise NodeLost(self.broken or "the cluster is not ready")
        step_id = next(self.step_ids)
        step = pb.Step(step_id=step_id, hidden=tensor_msg(x), free=free,
                       segments=[pb.Segment(request_id=r, start=s, length=n) for r, s, n in segments])
        future = asyncio.get_running_loop().create_future()
        self.pending[step_id] = future
        sent = time.perf_counter()
        try:
            await self.stream.send(step)
            result: pb.Step = await asyncio.wait_for(future, self.step_timeout)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            raise NodeLost(f"the ring broke ({type(e).__name__})") from None
        finally:
            self.pending.pop(step_id, None)
        self.times.record(time.perf_counter() - sent, list(result.hops))
        if result.error:
            raise StepFailed(result.error)
        return tensor_from(result.hidden, self.device)

    async def Forward(self, request_iterator, context) -> None:
        """The last stage hands each finished step back here."""
        try:
            while (step := await context.read()) is not grpc.aio.EOF:
                future = self.pending.get(step.step_id)
                if future is not None and not future.done():
                    future.set_result(step)
                await context.write(pb.StepAck(step_id=step.step_id))
        except asyncio.CancelledError:
            return  # the server is stopping: the stream just ends
