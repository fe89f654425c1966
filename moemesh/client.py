"""`moemesh.connect("HOST:PORT")`: a model served by a cluster, with the interface of `moemesh.load`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import torch

from .spec.config import args_from_dict
from .model.generate import GenerationStats, token_rows
from .spec.routing import RoutingStats
from .model.tokenizer import Tokenizer
from .transport import moemesh_pb2 as pb
from .transport import moemesh_pb2_grpc as rpc
from .transport.wire import GRPC_OPTIONS, tensor_from


class ClusterModel:
    """`timeout`: seconds to wait for the coordinator to answer, and for the cluster to be ready to serve
    each request (past it, the request fails saying what the cluster waits for)."""

    def __init__(self, target: str, timeout: float = 30.0):
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self.stub = rpc.CoordinatorStub(self.channel)
        try:
            info = self.stub.Model(pb.Empty(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise ConnectionError(f"no moemesh coordinator answers at {target} ({e.code().name})") from None
        self.args = args_from_dict(json.loads(info.config_json))
        self.tokenizer = Tokenizer.from_json(info.tokenizer_json, info.tokenizer_config_json) if info.tokenizer_json else None
        gen = json.loads(info.generation_config_json) if info.generation_config_json else {}
        eos = gen.get("eos_token_id", list(self.args.eos_token_ids))
        self.eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        self.last_stats = GenerationStats()

    def logits(self, batch) -> torch.Tensor:
        """Full-sequence logits [batch, T, vocab] (float32) for equal-length token sequences."""
        rows = token_rows(batch, self.args.vocab_size, self.args.max_position_embeddings)
        reply = self._call(self.stub.Logits, pb.LogitsRequest(tokens=[t for r in rows for t in r], batch=len(rows),
                                                              ready_timeout_s=self.timeout))
        return tensor_from(reply.logits)

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
               speculative: str | None = "auto") -> Iterator[int]:
        """Yield new token ids as the cluster produces them (EOS included when reached). `speculative`: "mtp"
        (MTP drafts verified each trip), None or "off", or "auto": the coordinator's --speculative."""
        sampling = pb.Sampling(temperature=temperature, top_p=top_p, top_k=top_k, has_seed=seed is not None,
                               seed=seed or 0)
        request = pb.GenerateRequest(prompt=[int(t) for t in prompt_ids], max_new_tokens=max_new_tokens,
                                     sampling=sampling, stop=stop or [], ready_timeout_s=self.timeout,
                                     speculative={"auto": "", None: "off"}.get(speculative, speculative))
        self.last_stats = GenerationStats()
        try:
            for reply in self.stub.Generate(request):
                if reply.done:
                    self.last_stats = GenerationStats(reply.prompt_tokens, reply.new_tokens, reply.prefill_s,
                                                      reply.decode_s, reply.finish_reason, reply.steps,
                                                      reply.drafted, reply.accepted)
                    return
                yield reply.token
        except grpc.RpcError as e:
            raise _error(e) from None

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 256, **kwargs) -> list[int]:
        return list(self.stream(prompt_ids, max_new_tokens, **kwargs))

    def status(self) -> pb.Status:
        return self._call(self.stub.Cluster, pb.Empty())

    def routing_stats(self) -> RoutingStats:
        """Tokens routed to each expert of each MoE layer, over the whole cluster."""
        counts = self._call(self.stub.Routing, pb.Empty())
        stats = RoutingStats(counts.n_routed_experts or self.args.n_routed_experts)
        for layer, row in counts.layers.items():
            stats.add(layer, list(row.tokens))
        return stats

    def _call(self, method, request):
        try:
            return method(request)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ClusterModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error(e: grpc.RpcError) -> Exception:
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(e.details())
    return RuntimeError(f"cluster: {e.details() or e.code().name}")
