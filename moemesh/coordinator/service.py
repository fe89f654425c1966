"""The Coordinator gRPC service: what clients call (Model, Generate, Logits, Routing, Cluster) and what
workers call (Register, FetchTensors), each handed to the part of the coordinator that does it. Generate
and Logits wait for the cluster to be ready at most the request's `ready_timeout_s` (or the coordinator's
--ready-timeout), then fail saying what the cluster waits for."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from ..model.checkpoint import CheckpointError
from ..model.generate import Request, Sampling, speculation, token_rows
from ..transport import moemesh_pb2 as pb
from ..transport import moemesh_pb2_grpc as rpc
from ..transport.wire import tensor_msg

if TYPE_CHECKING:
    from .server import Coordinator


class CoordinatorService(rpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    async def Register(self, info: pb.NodeInfo, context) -> pb.RegisterReply:
        return self.c.members.register(info, context.peer())

    async def FetchTensors(self, request: pb.FetchRequest, context):
        try:
            chunks = self.c.loader.chunks(list(request.names))
        except CheckpointError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        for chunk in chunks:
            yield chunk

    async def Model(self, request: pb.Empty, context) -> pb.ModelInfo:
        path = Path(self.c.opts.model)

        def text(name: str) -> str:
            return (path / name).read_text() if (path / name).exists() else ""

        return pb.ModelInfo(config_json=text("config.json"), tokenizer_json=text("tokenizer.json"),
                            tokenizer_config_json=text("tokenizer_config.json"),
                            generation_config_json=text("generation_config.json"))

    async def _until_ready(self, timeout_s: float, context) -> None:
        timeout_s = timeout_s or self.c.opts.ready_timeout
        try:
            await asyncio.wait_for(self.c.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"not ready after {timeout_s:g} s: {self.c.waiting_for()}")

    async def Generate(self, request: pb.GenerateRequest, context):
        c, s = self.c, request.sampling
        try:
            sampling = Sampling(s.temperature, s.top_p or 1.0, s.top_k, s.seed if s.has_seed else None)
            speculative = speculation(request.speculative, c.mtp) if request.speculative else c.speculative
            req = Request(list(request.prompt), request.max_new_tokens or 256, sampling, c.eos,
                          list(request.stop) or None, speculative)
            req.start(c.args.vocab_size, c.args.max_position_embeddings, c.tokenizer.decode if c.tokenizer else None)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await self._until_ready(request.ready_timeout_s, context)
        out = c.scheduler.submit(req)
        try:
            while True:
                kind, value = await out.get()
                if kind == "token":
                    yield pb.GenerateReply(token=value)
                elif kind == "error":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, value)
                else:
                    yield pb.GenerateReply(done=True, finish_reason=value.finish_reason, prefill_s=value.prefill_s,
                                           decode_s=value.decode_s, prompt_tokens=value.prompt_tokens,
                                           new_tokens=value.new_tokens, steps=value.steps, drafted=value.drafted,
                                           accepted=value.accepted)
                    return
        finally:
            c.scheduler.cancel(req)  # a client that leaves early stops its request

    async def Logits(self, request: pb.LogitsRequest, context) -> pb.LogitsReply:
        c = self.c
        tokens, batch = list(request.tokens), request.batch or 1
        length = len(tokens) // batch if len(tokens) % batch == 0 else 0  # 0: token_rows refuses the batch
        try:
            rows = token_rows([tokens[i * length : (i + 1) * length] for i in range(batch)], c.args.vocab_size,
                              c.args.max_position_embeddings)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await self._until_ready(request.ready_timeout_s, context)
        try:
            logits = await c.scheduler.logits(rows)
        except RuntimeError as e:  # a step failed, or a lost node could not be re-planned around
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.LogitsReply(logits=tensor_msg(logits))

    async def Routing(self, request: pb.Empty, context) -> pb.RoutingCounts:
        stats = await self.c.loader.routing_stats(self.c.members.ready())
        reply = pb.RoutingCounts(n_routed_experts=stats.n_routed_experts)
        for layer, counts in stats.layers.items():
            reply.layers[layer].tokens.extend(counts)
        return reply

    async def Cluster(self, request: pb.Empty, context) -> pb.Status:
        c, times, plan = self.c, self.c.ring.times, self.c.loader.plan
        return pb.Status(
            coordinator=c.info(), model=str(c.opts.model),
            nodes=[w.status(times.busy_ms(w.node_id)) for w in c.members.workers.values()],
            tokens_per_s=c.scheduler.tokens_per_s(), active_requests=len(c.scheduler.active),
            predicted_tokens_per_s=plan.tokens_per_s if plan else 0.0,
            plan_json=json.dumps(plan.to_dict()) if plan else "", state=c.state,
            hop_ms_median=times.hop_ms_median(), hop_ms_p99=times.hop_ms_p99(), step_ms_median=times.step_ms_median(),
            waiting_for="" if c.state == "ready" else c.waiting_for(), speculative=c.speculative,
            draft_acceptance=c.scheduler.served.acceptance_rate, tokens_per_trip=c.scheduler.served.tokens_per_step)
