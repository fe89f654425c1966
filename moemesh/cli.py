"""`moemesh`: the command line. Model math lives below; this file only parses, prints and times."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distributed inference of DeepSeek-V3-class mixture-of-experts models.")
console = Console(stderr=True)


def _add_lifecycles() -> None:
    from .coordinator.cli import app as coordinator_app
    from .worker.cli import app as worker_app

    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(worker_app, name="worker")


_add_lifecycles()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def load_with_progress(model: Path, backend: str, dtype: str, device: str):
    from .model.engine import Engine

    with Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(str(model), total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        return Engine.load(model, backend=backend, dtype=dtype, device=device, progress=progress)


def run_generation(engine, prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float, top_k: int,
                   seed: int | None, stop: list[str] | None, save_routing: Path | None) -> None:
    from .model.generate import TextStream

    tok = engine.tokenizer
    if tok is None:
        raise typer.BadParameter("this checkpoint has no tokenizer.json, so text prompts cannot be encoded")
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    text = TextStream(tok.decode, stop)
    out = sys.stdout
    if not chat:
        out.write(prompt)
    for token in engine.stream(ids, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop):
        out.write(text.add(token))
        out.flush()
    out.write(text.flush() + "\n")
    s, a = engine.last_stats, engine.args
    per_layer = engine.kv_bytes_per_token_per_layer
    layers = a.num_hidden_layers
    console.print(
        f"[dim]prompt {s.prompt_tokens} tokens: prefill {s.prefill_tokens_per_s:.1f} tok/s | "
        f"{s.new_tokens} new tokens: decode {s.decode_tokens_per_s:.1f} tok/s | finish: {s.finish_reason}[/]")
    console.print(
        f"[dim]weights {_fmt_bytes(engine.weight_bytes)} | KV cache {per_layer} B/token/layer "
        f"(({a.kv_lora_rank} latent + {a.qk_rope_head_dim} rope) x {engine.backend.element_size} B), "
        f"{_fmt_bytes(per_layer * layers * (s.prompt_tokens + s.new_tokens))} for this request over {layers} layers[/]")
    if save_routing:
        engine.routing_stats().save(save_routing)
        console.print(f"[dim]routing statistics written to {save_routing}[/]")


@app.command()
def generate(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory (config.json, *.safetensors, tokenizer.json)."),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0, help="0: no limit."),
    seed: int | None = typer.Option(None),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop when this text appears (repeatable)."),
    backend: str = typer.Option("torch"),
    dtype: str = typer.Option("bfloat16", help="Compute dtype: bfloat16, float16 or float32 (FP8 weights stay FP8)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    save_routing: Path | None = typer.Option(None, help="Write per-expert routing counts (JSON) for the planner."),
) -> None:
    """Generate text from a checkpoint on this machine, streaming it as it comes."""
    from .model.checkpoint import CheckpointError

    try:
        engine = load_with_progress(model, backend, dtype, device)
        run_generation(engine, prompt, chat, max_tokens, temperature, top_p, top_k, seed, stop, save_routing)
    except (CheckpointError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


@app.command()
def demo(
    prompt: str = typer.Option("Tell me about mixture-of-experts models.", "--prompt", "-p"),
    max_tokens: int = typer.Option(48, "--max-tokens", "-n", min=1),
    dtype: str = typer.Option("bfloat16"),
) -> None:
    """Run the built-in default model end to end (no download)."""
    from .demo import default_demo_dir, ensure_demo_checkpoint

    path, built = ensure_demo_checkpoint()
    console.print(
        f"[bold]moemesh demo[/]: {'built' if built else 'using'} the built-in demo checkpoint at {path} — a small "
        "DeepSeek-V3-architecture model (MLA, 32 routed experts + 1 shared, YaRN rope, MTP layer) with random "
        "weights, made on this machine. Its text is gibberish; the point is the whole path working.")
    engine = load_with_progress(path if path.exists() else default_demo_dir(), "torch", dtype, "cpu")
    a = engine.args
    console.print(f"[dim]{a.num_hidden_layers} layers, hidden {a.hidden_size}, {a.n_routed_experts} experts "
                  f"(top-{a.num_experts_per_tok}), vocab {a.vocab_size}, MTP layers: {len(engine.model.mtp)}[/]")
    run_generation(engine, prompt, True, max_tokens, 0.8, 0.95, 0, 0, None, None)


if __name__ == "__main__":
    app()
