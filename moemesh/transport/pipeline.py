"""A persistent Forward stream to the next stage of the ring (used by workers and the coordinator)."""

from __future__ import annotations

import asyncio

import grpc

from . import moemesh_pb2 as pb
from . import moemesh_pb2_grpc as rpc
from .wire import GRPC_OPTIONS


class StepStream:
    def __init__(self, target: str):
        self.channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        self.call = rpc.PipelineStub(self.channel).Forward()
        self.acks = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            async for _ in self.call:
                pass
        except grpc.aio.AioRpcError:
            pass  # the next stage went away: the coordinator notices and re-plans

    async def send(self, step: pb.Step) -> None:
        await self.call.write(step)

    async def close(self) -> None:
        """End the stream (the next stage's handler then returns), then the channel."""
        try:
            await asyncio.wait_for(self.call.done_writing(), 1.0)
        except (asyncio.TimeoutError, grpc.RpcError, grpc.aio.UsageError):
            pass  # the peer is gone already
        self.acks.cancel()
        await self.channel.close()
