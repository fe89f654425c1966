"""`moemesh`: the command line. Model math lives below; this file only parses, prints and times."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import builtin_model
from .coordinator.cli import app as coordinator_app
from .coordinator.cli import print_status, resolve
from .spec.units import fmt_bytes
from .worker.cli import app as worker_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distributed inference of DeepSeek-V3-class mixture-of-experts models.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(worker_app, name="worker")
console = Console(stderr=True)


def load_with_progress(model: Path, backend: str, dtype: str, device: str):
    from .model.engine import Engine

    with Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(str(model), total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        return Engine.load(model, backend=backend, dtype=dtype, device=device, progress=progress)


def stream_text(model, prompt: str, chat: bool, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                speculative: str = "auto") -> None:
    """Print the completion as it streams, then tokens/s (and how the MTP drafts fared). `model`: an Engine or
    a ClusterModel."""
    from .model.generate import TextStream

    tok = model.tokenizer
    if tok is None:
        raise ValueError("this checkpoint has no tokenizer.json, so text prompts cannot be encoded")
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    text = TextStream(tok.decode, stop)
    if not chat:
        sys.stdout.write(prompt)
    for token in model.stream(ids, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                              speculative=speculative):
        sys.stdout.write(text.add(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    s = model.last_stats
    console.print(f"[dim]prompt {s.prompt_tokens} tokens: prefill {s.prefill_tokens_per_s:.1f} tok/s | "
                  f"{s.new_tokens} new tokens: decode {s.decode_tokens_per_s:.1f} tok/s | finish: {s.finish_reason}[/]")
    if s.drafted:
        console.print(f"[dim]speculative (MTP): {s.accepted} of {s.drafted} drafts accepted "
                      f"({100 * s.acceptance_rate:.0f}%), {s.tokens_per_step:.2f} tokens per step[/]")


def report_local(engine, save_routing: Path | None = None) -> None:
    a, s = engine.args, engine.last_stats
    per_layer = engine.kv_bytes_per_token_per_layer
    console.print(
        f"[dim]weights {fmt_bytes(engine.weight_bytes)} | KV cache {per_layer} B/token/layer "
        f"(({a.kv_lora_rank} latent + {a.qk_rope_head_dim} rope) x {engine.backend.element_size} B), "
        f"{fmt_bytes(per_layer * a.num_hidden_layers * (s.prompt_tokens + s.new_tokens))} for this request "
        f"over {a.num_hidden_layers} layers[/]")
    if save_routing:
        engine.routing_stats().save(save_routing)
        console.print(f"[dim]routing statistics written to {save_routing}[/]")


@app.command()
def generate(
    model: Path = typer.Option(None, "--model", "-m", help="Checkpoint directory (config.json, *.safetensors, "
                                                          "tokenizer.json); default: the built-in model."),
    cluster: str = typer.Option(None, help="Generate on a cluster: the coordinator's HOST:PORT, or 'auto' to find it by mDNS."),
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
    speculative: str = typer.Option("auto", help="mtp: draft each next token with the checkpoint's MTP module and "
                                                 "verify it in the next step (same output, fewer steps when drafts "
                                                 "hold); off; auto: mtp where the checkpoint has MTP weights "
                                                 "(on a cluster: the coordinator's --speculative)."),
) -> None:
    """Generate text, streaming it as it comes: on this machine (--model) or on a cluster (--cluster)."""
    from .model.checkpoint import CheckpointError
    from .model.generate import SPECULATIVE

    if model is not None and cluster is not None:
        raise typer.BadParameter("give either --model DIR (this machine) or --cluster HOST:PORT, not both")
    if speculative not in SPECULATIVE:
        raise typer.BadParameter(f"--speculative must be one of {', '.join(SPECULATIVE)}")
    try:
        if cluster is not None:
            from .client import ClusterModel

            with ClusterModel(resolve(cluster)) as remote:
                stream_text(remote, prompt, chat, max_tokens, temperature, top_p, top_k, seed, stop, speculative)
                print_status(remote.status())
            return
        engine = load_with_progress(model or builtin_model(), backend, dtype, device)
        stream_text(engine, prompt, chat, max_tokens, temperature, top_p, top_k, seed, stop, speculative)
        report_local(engine, save_routing)
    except (CheckpointError, ValueError, ConnectionError, RuntimeError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory (config.json, *.safetensors, tokenizer.json)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=1, max=65535),
    api_key: str = typer.Option(None, envvar="MOEMESH_API_KEY", help="Require 'Authorization: Bearer KEY' on every "
                                                                    "route but /health and the dashboard page."),
    max_requests: int = typer.Option(64, min=1, help="Completions in flight and waiting; more get 429."),
    backend: str = typer.Option("torch"),
    dtype: str = typer.Option("bfloat16", help="Compute dtype: bfloat16, float16 or float32 (FP8 weights stay FP8)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    speculative: str = typer.Option("auto", help="Requests' MTP speculation: mtp, off, or auto (mtp where the "
                                                 "checkpoint has MTP weights)."),
) -> None:
    """Serve a model on this machine, no cluster: the OpenAI-compatible HTTP API, /metrics and the dashboard."""
    import asyncio

    from .api.app import ApiOptions, serve_api
    from .api.serving import LocalServing
    from .model.checkpoint import CheckpointError
    from .model.generate import SPECULATIVE
    from .process import stop_on_signals

    if speculative not in SPECULATIVE:
        raise typer.BadParameter(f"--speculative must be one of {', '.join(SPECULATIVE)}")

    async def run(engine) -> None:
        local = LocalServing(engine, model, speculative)
        tasks = [asyncio.ensure_future(local.run()),
                 asyncio.ensure_future(serve_api(local.served, ApiOptions(host, port, api_key, max_requests),
                                                 console.print))]
        stop = asyncio.ensure_future(stop_on_signals().wait())
        done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
        for t in [*tasks, stop]:
            t.cancel()
        await asyncio.gather(*tasks, stop, return_exceptions=True)
        for t in done:
            if t is not stop and t.exception() is not None:
                raise t.exception()

    try:
        engine = load_with_progress(model, backend, dtype, device)
        asyncio.run(run(engine))
    except (CheckpointError, ValueError, OSError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


@app.command()
def demo(
    prompt: str = typer.Option("def fibonacci(n):\n", "--prompt", "-p", help="Python source to continue."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=1),
    workers: int = typer.Option(3, min=1, max=8, help="Local worker processes."),
    local: bool = typer.Option(False, help="One process, no cluster."),
    dtype: str = typer.Option("bfloat16"),
) -> None:
    """The built-in model end to end, no download: a coordinator and local workers on 127.0.0.1 complete a
    piece of Python (greedy, with MTP speculative decoding)."""
    from .launch import LocalCluster

    path = builtin_model()
    console.print(
        f"[bold]moemesh demo[/]: the built-in model ({path}) — a small DeepSeek-V3-architecture model (MLA, YaRN "
        "rope, routed + shared experts, an MTP layer) trained on the Python standard library by `moemesh train-demo`. "
        "It continues Python code.")
    if local:
        engine = load_with_progress(path, "torch", dtype, "cpu")
        stream_text(engine, prompt, False, max_tokens)
        report_local(engine)
        return
    with tempfile.TemporaryDirectory(prefix="moemesh-demo-") as logs:
        console.print(f"starting a coordinator and {workers} workers on 127.0.0.1 (separate processes; logs in {logs})")
        cluster = LocalCluster(path, workers, Path(logs), ["--split", "even", "--dtype", dtype])
        try:
            with Progress(TextColumn("{task.description}"), console=console, transient=True) as bar:
                bar.add_task("workers joining, profiling, loading their layers (the first run also builds the CPU kernels)")
                model = cluster.wait_ready(nodes=workers)
            console.print("[bold]the plan:[/]")
            print_status(model.status())
            stream_text(model, prompt, False, max_tokens)
            s = model.status()
            console.print(f"[dim]per-hop latency of a decode step's hidden state: median {s.hop_ms_median:.2f} ms, "
                          f"p99 {s.hop_ms_p99:.2f} ms over {len(s.nodes) + 1} hops per step[/]")
            model.close()
        except (TimeoutError, RuntimeError) as e:
            console.print(f"[red]the demo cluster failed:[/] {e}")
            raise typer.Exit(1) from None
        finally:
            cluster.close()


@app.command("train-demo")
def train_demo(
    minutes: float = typer.Option(25.0, min=0.1, help="Wall-clock training budget."),
    out: Path = typer.Option(Path("moemesh-demo-model"), help="Directory for the trained checkpoint."),
    seed: int = typer.Option(0, help="Seeds the corpus split, the initial weights and the batches."),
    weight_format: str = typer.Option("bf16", "--format", help="bf16, or fp8 (the official 128x128 block format)."),
) -> None:
    """Train the built-in model: a small DeepSeek-V3 (MLA, YaRN, grouped sigmoid routing, MTP) on this Python's
    standard library sources, on the CPU, with its own tokenizer; written as a Hugging Face checkpoint."""
    from .train.run import Settings, train

    settings = Settings(minutes=minutes, seed=seed, weight_format=weight_format)
    command = f"moemesh train-demo --minutes {minutes:g} --seed {seed} --format {weight_format}"
    columns = (TextColumn("[bold]training[/] step {task.fields[step]}"), BarColumn(),
               TextColumn("loss {task.fields[loss]:.3f} | {task.fields[tps]:.0f} tokens/s"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=1.0, step=0, loss=float("nan"), tps=0.0)

        def report(step: int, loss: float, tokens_per_s: float, done: float) -> None:
            bar.update(task, completed=done, step=step, loss=loss, tps=tokens_per_s)
            if not console.is_terminal and step % 10 == 0:  # a log file gets a line now and then
                console.print(f"step {step}: loss {loss:.3f}, {tokens_per_s:.0f} tokens/s, {100 * min(done, 1):.0f}% of budget")

        try:
            train(out, settings, report, log=console.print, command=command)
        except ValueError as e:
            console.print(f"[red]error:[/] {e}")
            raise typer.Exit(1) from None
    console.print(f"wrote {out} (model card: {out / 'README.md'})")


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="Hugging Face checkpoint directory (bf16/fp32, or the official FP8)."),
    dst: Path = typer.Argument(..., help="New directory for the quantized checkpoint."),
    bits: int = typer.Option(4, help="4 or 8."),
    group_size: int = typer.Option(64, help="Weights sharing one scale and bias: 32, 64 or 128."),
    keep: str = typer.Option("", help="Parts kept at --keep-bits, comma-separated: attn,shared,experts,dense,embed,head."),
    keep_bits: int = typer.Option(8, help="Bits of the --keep parts: 8, 4, or 16 to leave them unquantized."),
    shard_size: float = typer.Option(2.0, help="GB per output shard."),
) -> None:
    """Quantize a checkpoint to the MLX affine format (int4/int8 groups), streaming tensor by tensor."""
    from .quantize import Recipe, convert

    try:
        recipe = Recipe(bits, group_size, frozenset(p for p in keep.split(",") if p), keep_bits)
        with Progress(TextColumn("[bold]quantizing[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"),
                      TimeElapsedColumn(), TextColumn("[dim]{task.description}"), console=console) as bar:
            task = bar.add_task("", total=None)
            convert(src, dst, recipe, int(shard_size * 1e9),
                    lambda name, done, total: bar.update(task, description=name, completed=done, total=total))
    except ValueError as e:  # CheckpointError and ConfigError included
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    parts = f", {','.join(sorted(recipe.keep))} at {keep_bits} bits" if recipe.keep else ""
    console.print(f"wrote {dst}: {bits}-bit groups of {group_size}{parts}")


if __name__ == "__main__":
    app()
