"""The HTTP server: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, Prometheus' /metrics, and
the dashboard (`/`, fed by /api/status and the /api/events stream), on Starlette under uvicorn, in the event
loop of whatever serves the model (the coordinator's, or `moemesh serve`'s).

A completion is one `Request` (moemesh.model.generate) submitted to the scheduler, which batches it with every
other request in flight, HTTP or gRPC. Its tokens stream back as server-sent events or are collected into one
answer; a client that goes away cancels its request, which leaves the next step, and its KV caches are freed
on every node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..model.generate import Request, Sampling, TextStream
from ..spec.routing import RoutingStats
from ..transport import moemesh_pb2 as pb
from . import openai
from .metrics import CONTENT_TYPE, Metrics
from .openai import ApiError, Params
from .serving import Served

DASHBOARD = Path(__file__).parent / "dashboard"
OPEN_PATHS = ("/health", "/")  # no key needed: liveness, and the dashboard's page and files (they hold no data)


@dataclass
class ApiOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, every route but OPEN_PATHS wants "Authorization: Bearer KEY"
    max_requests: int = 64  # completions in flight and waiting; one more is answered 429
    snapshot_s: float = 1.0  # the dashboard's update period; status and routing are read at most this often


class Api:
    def __init__(self, served: Served, opts: ApiOptions):
        self.served, self.opts = served, opts
        self.metrics = Metrics()
        self.waiting = 0  # completions waiting for the cluster to be ready
        self.running = 0  # completions submitted to the scheduler
        self.ttft_s: deque[float] = deque(maxlen=100)  # recent times to first token, for the dashboard
        self.last: tuple[float, pb.Status, RoutingStats] | None = None
        self.reading = asyncio.Lock()

    # ---- the app
    def app(self) -> ASGIApp:
        routes = [
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/v1/models/{model:path}", self.model),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/metrics", self.prometheus),
            Route("/api/status", self.status),
            Route("/api/events", self.events),
            Route("/", self.dashboard),
            Route("/dashboard/{name}", self.asset),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error, ApiError: self.api_error})
        return KeyCheck(app, self.opts.api_key)

    async def http_error(self, request: HttpRequest, e: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return await self.api_error(request, ApiError(e.status_code, message))

    async def api_error(self, request: HttpRequest, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    # ---- small routes
    async def health(self, request: HttpRequest) -> Response:
        if self.served.ready.is_set():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "not ready", "waiting_for": self.served.waiting_for()}, status_code=503)

    def model_card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": 0, "owned_by": "moemesh",
                "context_length": self.served.context}

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: HttpRequest) -> Response:
        name = request.path_params["model"]
        if name != self.served.name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.served.name}'",
                           param="model", code="model_not_found")
        return JSONResponse(self.model_card())

    async def dashboard(self, request: HttpRequest) -> Response:
        return FileResponse(DASHBOARD / "index.html")

    async def asset(self, request: HttpRequest) -> Response:
        name = request.path_params["name"]
        path = DASHBOARD / name
        if "/" in name or not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    # ---- completions
    async def completions(self, http: HttpRequest) -> Response:
        return await self.complete(http, chat=False)

    async def chat(self, http: HttpRequest) -> Response:
        return await self.complete(http, chat=True)

    async def complete(self, http: HttpRequest, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        try:
            response = await self._complete(http, chat)
        except ApiError as e:
            self.metrics.requests.labels(route, str(e.status)).inc()
            raise
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    async def _complete(self, http: HttpRequest, chat: bool) -> Response:
        arrived = time.perf_counter()
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        p = openai.parse(body, chat)
        if p.model != self.served.name:
            raise ApiError(404, f"the model '{p.model}' does not exist; this server serves '{self.served.name}'",
                           param="model", code="model_not_found")
        req = self.request(p)
        await self.admit()
        tokens = self.tokens(req, arrived)
        if p.stream:
            return StreamingResponse(self.sse(p, req, tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.collect(http, p, req, tokens)

    def request(self, p: Params) -> Request:
        """The generation request, started (its prompt checked against the model): ApiError(400) naming the
        field at fault."""
        s, tok = self.served, self.served.tokenizer
        field = "messages" if p.chat else "prompt"
        if tok is None and (p.chat or isinstance(p.prompt, str)):
            raise ApiError(400, "this model has no tokenizer.json: send the prompt as token ids to /v1/completions",
                           param=field)
        try:
            if p.chat:
                ids = tok.encode_chat(p.messages)
            else:
                ids = tok.encode(p.prompt) if isinstance(p.prompt, str) else p.prompt
        except ValueError as e:  # the chat template refused the messages
            raise ApiError(400, str(e), param=field) from None
        if len(ids) >= s.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {s.context} positions, "
                                "and at least one must be left to generate", param=field, code="context_length_exceeded")
        max_new = p.max_tokens or (s.context - len(ids) if p.chat else 16)
        try:
            req = Request(list(ids), max_new, Sampling(p.temperature, p.top_p, p.top_k, p.seed), s.eos,
                          p.stop or None, s.speculative)
            return req.start(s.args.vocab_size, s.context, tok.decode if tok else None)
        except ValueError as e:
            raise ApiError(400, str(e), param="stop" if "stop" in str(e) else field) from None

    async def admit(self) -> None:
        """Wait for the cluster to be ready: ApiError 429 when too many completions are in flight and waiting,
        503 when it is not ready within its ready timeout."""
        s = self.served
        if self.waiting + self.running >= self.opts.max_requests:
            raise ApiError(429, f"{self.waiting + self.running} requests are in flight or waiting (at most "
                                f"{self.opts.max_requests}); try again shortly", code="queue_full")
        self.waiting += 1
        self.metrics.queued.set(self.waiting)
        try:
            await asyncio.wait_for(s.ready.wait(), s.ready_timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"not ready after {s.ready_timeout:g} s: {s.waiting_for()}", code="not_ready") from None
        finally:
            self.waiting -= 1
            self.metrics.queued.set(self.waiting)

    async def tokens(self, req: Request, arrived: float) -> AsyncIterator[int]:
        """The request's tokens as the scheduler keeps them (submitted at the first `anext`); ends when it
        finishes (its stats then final), raises RuntimeError when it fails. Closed early (the client went away),
        it cancels the request."""
        out = self.served.scheduler.submit(req)
        self.running += 1
        self.metrics.in_flight.set(self.running)
        last = 0.0
        try:
            while True:
                kind, value = await out.get()
                if kind == "error":
                    raise RuntimeError(value)
                if kind == "done":
                    return
                now = time.perf_counter()
                if last:
                    self.metrics.itl.observe(now - last)
                else:
                    self.metrics.ttft.observe(now - arrived)
                    self.ttft_s.append(now - arrived)
                last = now
                yield value
        finally:
            self.served.scheduler.cancel(req)  # a no-op once it finished
            self.running -= 1
            self.metrics.in_flight.set(self.running)

    def text_stream(self, p: Params) -> TextStream:
        tok = self.served.tokenizer
        return TextStream(tok.decode if tok else lambda ids: "", p.stop)

    async def sse(self, p: Params, req: Request, tokens: AsyncIterator[int]) -> AsyncIterator[str]:
        """The answer as server-sent events: chunks of text, the finish reason, the usage when asked for, then
        `data: [DONE]`. A failure mid-stream is an event with an error in OpenAI's shape."""
        rid, text = openai.new_id(p.chat), self.text_stream(p)
        if p.chat:
            yield event(openai.chunk(p, rid, None, role=True))
        try:
            async for token in tokens:
                delta = text.add(token)
                if delta:
                    yield event(openai.chunk(p, rid, delta))
        except RuntimeError as e:
            yield event(ApiError(503, str(e), code="generation_failed").body())
            return
        rest = text.flush()
        if rest:
            yield event(openai.chunk(p, rid, rest))
        yield event(openai.chunk(p, rid, None, req.stats.finish_reason))
        if p.include_usage:
            yield event(openai.usage_chunk(p, rid, openai.usage(req.stats.prompt_tokens, req.stats.new_tokens)))
        yield "data: [DONE]\n\n"

    async def collect(self, http: HttpRequest, p: Params, req: Request, tokens: AsyncIterator[int]) -> Response:
        """The whole answer at once; a client that disconnects before it is done cancels the request."""
        text = self.text_stream(p)

        async def run() -> None:
            async for token in tokens:
                text.add(token)

        task = asyncio.ensure_future(run())
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return Response(status_code=499)  # nobody reads it
            task.result()
        except RuntimeError as e:
            raise ApiError(503, str(e), code="generation_failed") from None
        finally:
            if not task.done():  # this handler was cancelled (the server stops)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return JSONResponse(openai.completion(p, openai.new_id(p.chat), text.text, req.stats.finish_reason,
                                              openai.usage(req.stats.prompt_tokens, req.stats.new_tokens)))

    # ---- what the cluster is doing: metrics and the dashboard
    async def read(self) -> tuple[pb.Status, RoutingStats]:
        """The status and routing counts, read at most once per `snapshot_s` however many ask."""
        async with self.reading:
            if self.last is None or time.monotonic() - self.last[0] >= self.opts.snapshot_s:
                status = await self.served.status()
                self.last = (time.monotonic(), status, await self.served.routing())
            return self.last[1], self.last[2]

    async def prometheus(self, request: HttpRequest) -> Response:
        status, routing = await self.read()
        return Response(self.metrics.render(status, routing, self.served.scheduler.served), media_type=CONTENT_TYPE)

    async def snapshot(self) -> dict:
        """What the dashboard shows, as JSON."""
        s, routing = await self.read()
        plan = json.loads(s.plan_json) if s.plan_json else {}
        layers = sorted(routing.layers)
        return {
            "model": self.served.name, "state": s.state, "waiting_for": s.waiting_for,
            "tokens_per_s": s.tokens_per_s, "predicted_tokens_per_s": s.predicted_tokens_per_s,
            "active_requests": s.active_requests, "api_in_flight": self.running, "api_waiting": self.waiting,
            "ttft_ms_median": 1e3 * statistics.median(self.ttft_s) if self.ttft_s else None,
            "step_ms_median": s.step_ms_median, "hop_ms_median": s.hop_ms_median, "hop_ms_p99": s.hop_ms_p99,
            "speculative": s.speculative, "draft_acceptance": s.draft_acceptance, "tokens_per_trip": s.tokens_per_trip,
            "coordinator": s.coordinator.name,
            "nodes": [{"name": n.info.name, "state": n.state, "backend": n.info.backend, "device": n.info.device,
                       "cpu_isa": n.cpu_isa, "memory_total": n.info.memory_total, "memory_free": n.info.memory_free,
                       "weight_bytes": n.weight_bytes, "kv_bytes": n.kv_bytes, "layers": list(n.layers),
                       "experts": n.experts, "rtt_ms": 1e3 * n.rtt_s, "busy_ms": n.busy_ms} for n in s.nodes],
            "plan": {k: plan[k] for k in ("method", "quant", "tokens_per_s", "stages", "notes") if k in plan},
            "heatmap": {"layers": layers, "experts": routing.n_routed_experts,
                        "counts": [routing.layers[layer] for layer in layers]},
        }

    async def status(self, request: HttpRequest) -> Response:
        return JSONResponse(await self.snapshot())

    async def events(self, request: HttpRequest) -> Response:
        """The snapshot every `snapshot_s`, as server-sent events, until the client leaves."""

        async def stream() -> AsyncIterator[str]:
            while True:
                yield event(await self.snapshot())
                await asyncio.sleep(self.opts.snapshot_s)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class KeyCheck:
    """ASGI middleware: with a key, every HTTP route but OPEN_PATHS and /dashboard/ files wants
    "Authorization: Bearer KEY"."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.key and scope["type"] == "http" and path not in OPEN_PATHS and not path.startswith("/dashboard/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {self.key}":
                error = ApiError(401, "a valid API key is required: send \"Authorization: Bearer KEY\"",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """Signals stay with the process that runs this server: it stops the server by cancelling `serve_api`."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve_api(served: Served, opts: ApiOptions, log: Callable[[str], None] = print) -> None:
    """Serve the API in this event loop until cancelled, then shut down in order (open streams get a second).
    OSError when the port cannot be bound."""
    try:
        sock = socket.create_server((opts.host, opts.port), family=socket.AF_INET6 if ":" in opts.host else socket.AF_INET)
    except OSError as e:
        raise OSError(f"the HTTP API cannot listen on {opts.host}:{opts.port} ({e.strerror or e})") from None
    config = uvicorn.Config(Api(served, opts).app(), log_config=None, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1, lifespan="off")
    server = _Server(config)
    log(f"HTTP API (OpenAI-compatible) and dashboard on http://{opts.host}:{sock.getsockname()[1]}/")
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()
