"""`coordinator start` and `coordinator status` (also under `moemesh coordinator ...`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from ..spec.units import fmt_bytes, ranges, seconds

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The machine that plans and serves.")
console = Console(stderr=True)


def resolve(target: str | None, cluster: str = "default", interfaces: list[str] | None = None) -> str:
    """HOST:PORT given, or the coordinator of `cluster` found by mDNS."""
    if target and target != "auto":
        return target
    from ..transport.discovery import find_coordinator

    found = asyncio.run(find_coordinator(cluster, interfaces))
    if found is None:
        raise typer.BadParameter(f"no coordinator of cluster '{cluster}' found by mDNS; pass HOST:PORT")
    return found


@app.command()
def start(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory (config.json, *.safetensors, tokenizer)."),
    name: str = typer.Option("coordinator"),
    cluster: str = typer.Option("default", help="Several clusters on one LAN stay apart by name."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(7070, help="Port to listen on."),
    expect: int = typer.Option(None, help="Wait for this many workers before planning."),
    wait: str = typer.Option(None, help="With --expect: wait at most this long (e.g. 30s); without: this long after the first worker (default 5s)."),
    dtype: str = typer.Option("bfloat16", help="Compute dtype on every node (FP8 weights stay FP8)."),
    split: str = typer.Option("auto", help="auto: the planner's fastest plan; even: equal layer split; even+experts: also spread experts."),
    plan: Path = typer.Option(None, help="A plan.json (from `placement plan`) naming the workers."),
    context: int = typer.Option(4096, help="Tokens of KV cache to leave room for."),
    ready_timeout: str = typer.Option("30s", help="How long a request waits for the cluster to be ready, then fails "
                                                  "(a client may ask for another wait)."),
    speculative: str = typer.Option("auto", help="Requests' default (each may say otherwise): mtp drafts each next "
                                                 "token with the MTP module on this node and verifies it on the next "
                                                 "trip (same output); off; auto: mtp where the checkpoint has MTP "
                                                 "weights."),
    mdns_interface: list[str] = typer.Option(None, help="IPv4 address of an interface for mDNS (repeatable)."),
    no_mdns: bool = typer.Option(False, help="Do not announce on mDNS (workers then need --coordinator)."),
    api_port: int = typer.Option(8000, min=0, max=65535, help="Port of the OpenAI-compatible HTTP API, /metrics and "
                                                            "the dashboard (0: none)."),
    api_host: str = typer.Option(None, help="Address the HTTP API listens on (default: --host)."),
    api_key: str = typer.Option(None, envvar="MOEMESH_API_KEY", help="Require 'Authorization: Bearer KEY' on every "
                                                                    "HTTP route but /health and the dashboard page."),
    api_max_requests: int = typer.Option(64, min=1, help="HTTP completions in flight and waiting; more get 429."),
) -> None:
    """Serve a model on the workers that join: plan, load, then generate (`moemesh generate --cluster`, or the
    HTTP API on --api-port)."""
    from ..model.checkpoint import CheckpointError
    from ..model.generate import SPECULATIVE
    from .planning import SPLITS
    from ..api.app import ApiOptions
    from .server import UI, CoordinatorOptions, run_coordinator

    if split not in SPLITS:
        raise typer.BadParameter(f"--split must be one of {', '.join(SPLITS)}")
    if speculative not in SPECULATIVE:
        raise typer.BadParameter(f"--speculative must be one of {', '.join(SPECULATIVE)}")
    opts = CoordinatorOptions(model=model, name=name, cluster=cluster, host=host, port=port, expect=expect,
                              wait=seconds(wait) if wait else None, dtype=dtype, split=split, plan_file=plan,
                              context=context, mdns=not no_mdns, interfaces=mdns_interface or None,
                              ready_timeout=seconds(ready_timeout), speculative=speculative)
    with Progress(TextColumn("{task.description}"), BarColumn(), console=console,
                  transient=True) as bars:
        tasks: dict[str, int] = {}

        def load_progress(node: str, stage: str, done: int, total: int) -> None:
            key = f"{node} {stage}"
            if key not in tasks:
                tasks[key] = bars.add_task("", total=total or None)
            amount = f"{fmt_bytes(done)} of {fmt_bytes(total)}" if stage == "fetching" else f"{done}/{total} parts"
            bars.update(tasks[key], description=f"{node}: {stage} {amount}", completed=done, total=total or None,
                        visible=stage != "ready")

        log = bars.console.print
        api = http_api(ApiOptions(api_host or host, api_port, api_key, api_max_requests), log) if api_port else None
        try:
            asyncio.run(run_coordinator(opts, UI(log=log, load_progress=load_progress), api))
        except (CheckpointError, ValueError, OSError) as e:
            console.print(f"[red]error:[/] {e}")
            raise typer.Exit(1) from None


def http_api(opts, log):
    """The coordinator's HTTP API, as `run_coordinator` runs it; a port it cannot listen on leaves the cluster
    serving over gRPC alone."""
    from ..api.app import serve_api
    from ..api.serving import from_coordinator

    async def run(coordinator) -> None:
        try:
            await serve_api(from_coordinator(coordinator), opts, log)
        except OSError as e:
            log(f"[yellow]{e}:[/] no HTTP API; choose another port with --api-port (0: none)")

    return run


@app.command()
def status(
    coordinator: str = typer.Option(None, help="HOST:PORT (default: find it by mDNS)."),
    cluster: str = typer.Option("default"),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
    save_routing: Path = typer.Option(None, help="Write the tokens routed to each expert (for `placement --stats`)."),
) -> None:
    """Print the cluster: nodes, backend, memory, layers and experts held, link RTT, tokens/s."""
    from google.protobuf.json_format import MessageToDict

    from ..client import ClusterModel

    target = resolve(coordinator, cluster)
    try:
        with ClusterModel(target, timeout=10) as model:
            s = model.status()
            if save_routing:
                model.routing_stats().save(save_routing)
                console.print(f"routing statistics written to {save_routing}")
    except ConnectionError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(MessageToDict(s), indent=2))
        return
    print_status(s)


def print_status(s) -> None:
    out = Console()
    if not out.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        out = Console(width=160)
    out.print(f"[bold]{s.coordinator.name}[/] ({s.state}) serving {s.model}: {s.tokens_per_s:.1f} tokens/s now, "
              f"plan predicts {s.predicted_tokens_per_s:.1f}; {s.active_requests} active request(s)")
    if s.waiting_for:
        out.print(f"[yellow]not ready:[/] {s.waiting_for}")
    if s.step_ms_median:
        out.print(f"a step around the ring: median {s.step_ms_median:.2f} ms; per hop (its round trip less the "
                  f"nodes' busy time, over the hops): median {s.hop_ms_median:.2f} ms, p99 {s.hop_ms_p99:.2f} ms")
    speculation = f"speculative decoding (MTP) {'on' if s.speculative else 'off'} by default"
    if s.tokens_per_trip:
        speculation += (f"; since start: {100 * s.draft_acceptance:.0f}% of drafts accepted, "
                        f"{s.tokens_per_trip:.2f} tokens per request per trip")
    out.print(speculation)
    table = Table("node", "state", "backend/device", "mem used/free", "layers", "experts", "RTT", "mem / decode BW",
                  "decode compute", "busy/step")
    for n in s.nodes:
        used = n.held_bytes or n.weight_bytes + n.kv_bytes  # what the backend holds where it can tell (MLX, CUDA)
        isa = f" ({n.cpu_isa})" if n.cpu_isa else ""
        table.add_row(n.info.name, n.state, f"{n.info.backend}/{n.info.device}{isa}",
                      f"{fmt_bytes(used)} / {fmt_bytes(max(n.info.memory_free - used, 0))}", ranges(list(n.layers)) or "-",
                      str(n.experts), f"{n.rtt_s * 1e3:.2f} ms",
                      f"{n.memory_bandwidth / 1e9:.0f} / {n.decode_bandwidth / 1e9:.0f} GB/s",
                      f"{n.decode_flops / 1e9:.0f} GF/s", f"{n.busy_ms:.1f} ms")
    out.print(table)


if __name__ == "__main__":
    app()
