"""`placement`: plan a model onto a cluster from the command line (no weights, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..spec.config import ConfigError
from .cluster import ClusterError
from .planner import PlacementError, plan_problem, problem
from .render import compare_table, nodes_table, reference_lines, stages_table, summary_lines, svg
from ..spec.sizes import QUANTS
from .strategies import compare as compare_strategies

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Place a DeepSeek-V3-architecture model's layers and experts on a cluster.")
console = Console()
if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
    console = Console(width=120)

MODEL = typer.Option(..., "--model", help="config.json of the model (or its directory)")
CLUSTER = typer.Option(..., "--cluster", help="cluster description, YAML or JSON (see examples/clusters)")
STATS = typer.Option(None, "--stats", help="routing statistics (moemesh.routing/1 JSON); default uniform load")
CONTEXT = typer.Option(8192, "--context", help="tokens of KV cache to leave room for")
POSITION = typer.Option(0, "--position", help="tokens already in the cache when timing a decode step")
QUANT = typer.Option("int4", "--quant", help=f"weight format: {', '.join(QUANTS)}")
MTP = typer.Option(True, "--mtp/--no-mtp", help="hold the MTP module on the head")
REDUNDANCY = typer.Option(0.1, "--redundancy", help="extra expert slots per layer for replicas, fraction of experts")
GROUP_SIZE = typer.Option(64, "--group-size", help="int4/int8 quantization group size")


def _problem(model, cluster, stats, context, quant, position, mtp, redundancy, group_size):
    if quant not in QUANTS:
        raise typer.BadParameter(f"'{quant}' is not one of {', '.join(QUANTS)}", param_hint="--quant")
    return problem(model, cluster, stats, context, quant, position, mtp, redundancy, group_size=group_size)


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/red] {e}", highlight=False)
    raise typer.Exit(1)


@app.command("plan")
def plan_cmd(model: Path = MODEL, cluster: Path = CLUSTER, stats: Optional[Path] = STATS, context: int = CONTEXT,
             quant: str = QUANT, position: int = POSITION, mtp: bool = MTP, redundancy: float = REDUNDANCY,
             group_size: int = GROUP_SIZE,
             out: Path = typer.Option(Path("plan.json"), "--out", help="where to write the plan"),
             svg_path: Optional[Path] = typer.Option(None, "--svg", help="also draw the plan as SVG"),
             measured: Optional[float] = typer.Option(None, "--measured", help="measured tokens/s, to set beside "
                                                                                 "the prediction"),
             max_group: Optional[int] = typer.Option(None, "--max-group", help="largest expert-parallel group")):
    """Find the fastest predicted placement, print it and write plan.json."""
    try:
        p = _problem(model, cluster, stats, context, quant, position, mtp, redundancy, group_size)
        result = plan_problem(p, max_group)
    except (ConfigError, ClusterError, PlacementError, ValueError, OSError) as e:
        _fail(e)
    console.print(nodes_table(result))
    console.print(stages_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    ref = p.cluster.reference
    if ref is not None:
        rows = compare_strategies(p, result)
        exo = next((r.plan for r in rows if r.strategy.startswith("memory-proportional") and r.plan), None)
        for line in reference_lines(result, ref, exo):
            console.print(f"[bold]{line}[/bold]" if line.startswith("this plan") else line, highlight=False)
    if measured is not None:
        console.print(f"[bold]{result.compare_measured(measured)}[/bold]", highlight=False)
    result.save(out)
    console.print(f"wrote {out}", highlight=False)
    if svg_path is not None:
        svg_path.write_text(svg(result))
        console.print(f"wrote {svg_path}", highlight=False)


@app.command("compare")
def compare_cmd(model: Path = MODEL, cluster: Path = CLUSTER, stats: Optional[Path] = STATS, context: int = CONTEXT,
                quant: str = QUANT, position: int = POSITION, mtp: bool = MTP, redundancy: float = REDUNDANCY,
                group_size: int = GROUP_SIZE):
    """Score equal split (mlx-lm), memory-proportional (exo), EPLB and ours side by side."""
    try:
        p = _problem(model, cluster, stats, context, quant, position, mtp, redundancy, group_size)
    except (ConfigError, ClusterError, ValueError, OSError) as e:
        _fail(e)
    console.print(compare_table(compare_strategies(p)))
    if p.cluster.reference is not None:
        r = p.cluster.reference
        console.print(f"published measurement ({r.source}): {r.tokens_per_s} tokens/s", highlight=False)


if __name__ == "__main__":
    app()
