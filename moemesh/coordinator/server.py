"""The coordinator process: holds the head (embeddings, final norm, lm_head, MTP) and the tokenizer, and
wires its parts together — membership.py (who joined), loading.py (plan and shards), ring.py (steps around
the workers), scheduler.py (requests), service.py (the gRPC service) — around the cluster's state:
waiting (for workers, or for more when the model does not fit), loading, ready, or degraded (a worker of
the plan is lost). It re-plans when a worker joins or is lost."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ..kernels import get_backend
from ..model.checkpoint import Checkpoint
from ..model.engine import eos_ids
from ..model.generate import speculation
from ..model.model import Transformer
from ..model.tokenizer import Tokenizer
from ..placement import PlacementError
from ..process import stop_on_signals
from ..transport import moemesh_pb2 as pb
from ..transport import moemesh_pb2_grpc as rpc
from ..transport.discovery import Discovery
from ..transport.wire import GRPC_OPTIONS, PROTOCOL_VERSION, address, new_node_id, node_info
from .loading import Loader, describe
from .membership import Membership
from .nodes import NodeHandle
from .ring import Ring
from .scheduler import Scheduler
from .service import CoordinatorService


@dataclass
class CoordinatorOptions:
    model: Path
    name: str = "coordinator"
    cluster: str = "default"
    host: str = "0.0.0.0"
    port: int = 7070
    expect: int | None = None  # wait for this many workers...
    wait: float | None = None  # ...at most this long; without --expect: this long after the first (default 5 s)
    dtype: str = "bfloat16"
    split: str = "auto"
    plan_file: Path | None = None
    context: int = 4096  # KV-cache headroom the plan leaves per layer, in tokens
    mdns: bool = True
    interfaces: list[str] | None = None
    step_timeout: float = 600.0
    ready_timeout: float = 30.0  # a request waits this long for the cluster to be ready, unless it says
    speculative: str = "auto"  # requests' default: "mtp", "off", "auto" (MTP drafts where the checkpoint has them)
    heartbeat_s: float = 1.0
    lost_after: int = 3  # missed heartbeats


@dataclass
class UI:
    """How the coordinator tells a person what it is doing (the CLI draws progress bars)."""
    log: Callable[[str], None] = print
    load_progress: Callable[[str, str, int, int], None] = field(default=lambda node, stage, done, total: None)


class Coordinator:
    def __init__(self, opts: CoordinatorOptions, ui: UI | None = None):
        self.opts = opts
        self.ui = ui or UI()
        self.node_id = new_node_id()
        self.port = 0
        ckpt = Checkpoint(opts.model)
        self.args = ckpt.args
        head = Transformer.load(ckpt, get_backend("torch", self.args, dtype=opts.dtype), layers=[], head=True)
        self.tokenizer = Tokenizer.from_dir(opts.model)
        self.eos = eos_ids(Path(opts.model), self.args)
        self.mtp = bool(head.mtp)
        self.speculative = speculation(opts.speculative, self.mtp)  # ValueError: asked for MTP, none loaded
        self.state = "waiting"
        self.problem = ""  # why it waits (besides for workers to join) or re-plans
        self.ready = asyncio.Event()  # set while the state is "ready"
        self.serving = False  # the first plan is loaded: from now on a join re-plans
        self.ring = Ring(head.backend.device, opts.step_timeout)
        self.scheduler = Scheduler(head, self.ring.forward, self.replan)
        self.members = Membership(opts.cluster, self.args, opts.dtype, self.info, self.ui.log, self.joined, self.lost)
        self.loader = Loader(ckpt, opts.dtype, opts.split, opts.context, opts.plan_file, bool(head.mtp),
                             self.scheduler.compute, self.ui.load_progress)
        self.service = CoordinatorService(self)

    def info(self) -> pb.NodeInfo:
        return node_info(self.node_id, self.opts.name, self.opts.cluster, self.port)

    def set_state(self, state: str, problem: str = "") -> None:
        self.state, self.problem = state, problem
        if state == "ready":
            self.ready.set()
        else:
            self.ready.clear()

    def waiting_for(self) -> str:
        """What the cluster waits for before it serves, in words."""
        if self.state == "loading":
            return "loading the shards onto the workers"
        if self.state == "degraded":
            return f"re-planning after losing a worker ({self.problem})"
        if self.problem:
            return f"waiting for more workers: {self.problem}"
        expected = f" of {self.opts.expect} expected" if self.opts.expect else ""
        return f"waiting for workers ({len(self.members.ready())}{expected} joined)"

    async def replan(self, reason: str, keep_if_same: bool = False) -> None:
        """Plan on the ready workers and load the plan (unless `keep_if_same` and the layout would not change).
        The new shards hold no caches: the active requests replay. Raises when there is no plan to serve."""
        try:
            workers = self.members.ready()
            if not workers:
                raise RuntimeError("no workers left")
            plan = await self.loader.choose(workers, keep_if_same)
            if plan is None:
                return
            self.set_state("loading")
            self.ring.fail("re-planning")  # the old shards are being replaced
            self.ui.log(f"planning ({reason}): {describe(plan)}; predicted {plan.tokens_per_s:.1f} tokens/s")
            first = await self.loader.load(plan, workers)
        except (ValueError, RuntimeError) as e:  # PlacementError is a ValueError
            if self.state != "ready":
                self.set_state("waiting", f"the model does not fit ({e})" if isinstance(e, PlacementError) else str(e))
            raise
        await self.ring.connect(first)
        self.scheduler.reset_caches()
        self.set_state("ready")

    async def rebalance(self, reason: str) -> None:
        try:
            await self.replan(reason, keep_if_same=self.state == "ready")
        except (ValueError, RuntimeError) as e:
            self.ui.log(f"[yellow]could not re-plan[/] ({reason}): {e}")

    def rebalance_soon(self, reason: str) -> None:
        """Re-plan between steps; requests in flight replay from position 0 on the new shards."""
        asyncio.ensure_future(self.scheduler.exclusive(lambda: self.rebalance(reason)))

    def joined(self, w: NodeHandle) -> None:
        if self.serving:  # a join may allow a plan (waiting) or give a better one (ready)
            self.rebalance_soon(f"{w.name} joined")

    def lost(self, w: NodeHandle, reason: str) -> None:
        plan = self.loader.plan
        if plan is None or w.name not in {n for s in plan.stages for n in s.nodes}:
            return
        self.set_state("degraded", reason)
        self.ring.fail(reason)  # no step goes out on the broken ring
        self.rebalance_soon(reason)

    async def start(self) -> None:
        """Wait for workers, then plan and load; with too little memory, wait for more."""
        await self.members.gather(self.opts.expect, self.opts.wait)
        while True:
            try:
                await self.replan("startup")
                self.serving = True
                return
            except (ValueError, RuntimeError) as e:
                self.ui.log(f"[yellow]cannot place the model yet:[/] {e}\nwaiting for more workers...")
                self.members.joined.clear()
                await self.members.joined.wait()


async def run_coordinator(opts: CoordinatorOptions, ui: UI | None = None,
                          api: Callable[[Coordinator], Awaitable[None]] | None = None) -> None:
    """Serve until a signal. `api(coordinator)`, when given, runs in this event loop from the start (so it can
    answer while the cluster forms) until shutdown, when it is cancelled."""
    coordinator = Coordinator(opts, ui)
    ui = coordinator.ui
    server = grpc.aio.server(options=GRPC_OPTIONS)
    rpc.add_CoordinatorServicer_to_server(coordinator.service, server)
    rpc.add_PipelineServicer_to_server(coordinator.ring, server)
    coordinator.port = server.add_insecure_port(address(opts.host, opts.port))
    if coordinator.port == 0:
        raise OSError(f"cannot listen on {address(opts.host, opts.port)} (port in use?)")
    await server.start()
    a = coordinator.args
    ui.log(f"coordinator [bold]{opts.name}[/] serving {opts.model} ({a.num_hidden_layers} layers, "
           f"{a.n_routed_experts} experts) on port {coordinator.port}, cluster '{opts.cluster}'")
    discovery = Discovery(opts.interfaces) if opts.mdns else None
    members = coordinator.members
    tasks: list[asyncio.Future] = []
    stop = stop_on_signals()
    api_task = asyncio.ensure_future(api(coordinator)) if api else None
    try:
        if discovery is not None:
            await discovery.advertise(f"coordinator-{opts.name}-{coordinator.node_id}", coordinator.port, {
                "role": "coordinator", "cluster": opts.cluster, "protocol": str(PROTOCOL_VERSION),
                "node_id": coordinator.node_id, "name": opts.name})

            def gone(instance: str) -> None:  # a worker that leaves says goodbye on mDNS
                node = instance.rsplit("-", 1)[-1].split(".", 1)[0]
                if node in members.workers:
                    members.lose(members.workers[node], "it left (mDNS goodbye)")

            discovery.watch(lambda a: a.role == "worker" and a.properties.get("cluster") == opts.cluster,
                            lambda a: None, gone)
        starting = asyncio.ensure_future(coordinator.start())
        await asyncio.wait([starting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            ui.log("coordinator stopped")
            return
        starting.result()
        tasks = [asyncio.ensure_future(coordinator.scheduler.run()),
                 asyncio.ensure_future(members.heartbeats(opts.heartbeat_s, opts.lost_after))]
        ui.log(f"[green]ready[/]: generate with `moemesh generate --cluster HOST:{coordinator.port} -p ...`")
        await asyncio.wait([*tasks, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        ui.log("coordinator stopped")
    finally:
        for t in tasks:
            t.cancel()
        if api_task is not None:
            api_task.cancel()
            await asyncio.gather(api_task, return_exceptions=True)
        await coordinator.ring.close()  # end our outgoing stream first: the first stage's handler then ends
        await server.stop(grace=1)
        if discovery is not None:
            await discovery.close()
