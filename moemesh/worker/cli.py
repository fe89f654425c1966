"""`worker join` (also `moemesh worker join`)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..spec.units import fmt_bytes, size_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, help="A machine that lends its memory and compute.")
console = Console(stderr=True)


@app.command()
def join(
    name: str = typer.Option(None, help="What to call this machine (default: its host name)."),
    coordinator: str = typer.Option(None, help="HOST:PORT of the coordinator, where mDNS does not work."),
    cluster: str = typer.Option("default", help="Join only the coordinator of this cluster."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(0, help="Port to listen on (0: any free one)."),
    memory: str = typer.Option(None, help="Memory to offer, e.g. 48GB (default: what is available, less 10%)."),
    mdns_interface: list[str] = typer.Option(None, help="IPv4 address of an interface for mDNS (repeatable)."),
    no_mdns: bool = typer.Option(False, help="Neither announce nor look on mDNS (needs --coordinator)."),
    fetch_weights: bool = typer.Option(False, help="Take weights from the coordinator even if the files are here."),
    backend: str = typer.Option("auto", help="torch, mlx, or auto: MLX on Apple silicon, else torch."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, mps (torch), gpu (MLX's Metal), or auto: the GPU "
                                            "when there is one, else the CPU."),
) -> None:
    """Join a cluster: announce on mDNS, find the coordinator, and run what it assigns until Ctrl-C."""
    from ..transport.wire import host_name  # torch: imported by this command only, not by all of `moemesh`
    from .device import choose
    from .server import WorkerOptions, serve

    if no_mdns and not coordinator:
        raise typer.BadParameter("--no-mdns needs --coordinator HOST:PORT")
    try:
        offered = size_bytes(memory) if memory else None
        backend, device = choose(backend, device)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    opts = WorkerOptions(name=name or host_name(), cluster=cluster, host=host, port=port, coordinator=coordinator,
                         mdns=not no_mdns, interfaces=mdns_interface or None, memory=offered,
                         fetch_weights=fetch_weights, backend=backend, device=device)
    with Progress(TextColumn("{task.description}"), BarColumn(), console=console,
                  transient=True) as bars:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task("", total=total or None)
            amount = f"{fmt_bytes(done)} of {fmt_bytes(total)}" if stage == "fetching" else f"{done}/{total} parts"
            bars.update(tasks[stage], description=f"{stage} the shard: {amount}", completed=done, total=total or None,
                        visible=done < total)

        status = serve(opts, log=bars.console.print, progress=progress)
    sys.exit(status)


if __name__ == "__main__":
    app()
