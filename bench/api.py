"""What the HTTP layer costs: 1, 4 and 16 concurrent streaming clients on a local cluster (coordinator + 3
workers on 127.0.0.1) through the OpenAI-compatible API (SSE, httpx), next to the same load through
`moemesh.connect` (gRPC) in the same run: time to first token, inter-token latency p50/p99, aggregate tokens/s.

`python bench/api.py [--model DIR] [--clients 1 4 16] [--tokens 32]` -> JSON in bench/results/api.json.
Greedy, speculation off (every token is one step), so both paths run the same steps."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

import moemesh  # noqa: E402
from moemesh.launch import LocalCluster, free_port  # noqa: E402

PROMPTS = [list(range(100 + i, 116 + i)) for i in range(16)]  # 16 tokens each, distinct


def summary(ttft: list[float], gaps: list[float], tokens: int, wall: float) -> dict:
    gaps = sorted(gaps) or [0.0]
    return {"ttft_ms_median": 1e3 * statistics.median(ttft), "itl_ms_p50": 1e3 * gaps[len(gaps) // 2],
            "itl_ms_p99": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "tokens_per_s": tokens / wall,
            "tokens": tokens}


async def http_load(base: str, clients: int, tokens: int) -> dict:
    """`clients` streaming completions at once over HTTP; the times are those of the SSE events' arrival."""
    ttft, gaps, total = [], [], 0

    async def one(http: httpx.AsyncClient, prompt: list[int]) -> None:
        nonlocal total
        body = {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = last = time.perf_counter()
        first = True
        async with http.stream("POST", base + "/v1/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):  # the last chunk: tokens counted by the server (a chunk may hold several)
                    total += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                (ttft.append(now - t0) if first else gaps.append(now - last))
                first, last = False, now

    async with httpx.AsyncClient(timeout=300) as http:
        name = (await http.get(base + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http, PROMPTS[i % len(PROMPTS)]) for i in range(clients)))
        return summary(ttft, gaps, total, time.perf_counter() - t0)


def grpc_load(target: str, clients: int, tokens: int) -> dict:
    """The same load through `moemesh.connect`, one thread and channel per client."""
    ttft, gaps, total, lock = [], [], [0], threading.Lock()

    def one(model, prompt: list[int]) -> None:
        t0 = last = time.perf_counter()
        mine_first, mine_gaps, n = None, [], 0
        for _ in model.stream(prompt, max_new_tokens=tokens, speculative="off"):
            now = time.perf_counter()
            if mine_first is None:
                mine_first = now - t0
            else:
                mine_gaps.append(now - last)
            last, n = now, n + 1
        with lock:
            ttft.append(mine_first)
            gaps.extend(mine_gaps)
            total[0] += n

    models = [moemesh.connect(target) for _ in range(clients)]  # connected before the clock starts, as HTTP's pool
    threads = [threading.Thread(target=one, args=(m, PROMPTS[i % len(PROMPTS)])) for i, m in enumerate(models)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    for m in models:
        m.close()
    return summary(ttft, gaps, total[0], wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="rounds per load; each path's best round is kept")
    opts = ap.parse_args()
    path = opts.model or moemesh.builtin_model()
    port = free_port()
    result = {"model": str(path), "tokens": opts.tokens, "loads": []}
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-api-") as logs:
        cluster = LocalCluster(path, 3, Path(logs), ["--split", "even", "--api-port", str(port),
                                                     "--speculative", "off"])
        try:
            cluster.wait_ready(nodes=3).close()
            base = f"http://127.0.0.1:{port}"
            grpc_load(cluster.target, 1, 4)  # warm up both paths
            asyncio.run(http_load(base, 1, 4))
            for clients in opts.clients:
                runs = {"http": [], "grpc": []}
                for _ in range(opts.repeats):  # interleaved, so a busy moment of the machine hits both
                    runs["grpc"].append(grpc_load(cluster.target, clients, opts.tokens))
                    runs["http"].append(asyncio.run(http_load(base, clients, opts.tokens)))
                best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
                row = {"clients": clients, **best,
                       "http_over_grpc_tokens_per_s": best["http"]["tokens_per_s"] / best["grpc"]["tokens_per_s"],
                       "http_minus_grpc_itl_p50_ms": best["http"]["itl_ms_p50"] - best["grpc"]["itl_ms_p50"]}
                result["loads"].append(row)
                print(f"{clients:>3} clients: HTTP {best['http']['tokens_per_s']:.1f} tok/s vs gRPC "
                      f"{best['grpc']['tokens_per_s']:.1f} ({row['http_over_grpc_tokens_per_s']:.3f}x); "
                      f"ITL p50 {best['http']['itl_ms_p50']:.2f} vs {best['grpc']['itl_ms_p50']:.2f} ms, p99 "
                      f"{best['http']['itl_ms_p99']:.2f} vs {best['grpc']['itl_ms_p99']:.2f} ms; TTFT "
                      f"{best['http']['ttft_ms_median']:.1f} vs {best['grpc']['ttft_ms_median']:.1f} ms", flush=True)
        finally:
            cluster.close()
    print(f"wrote {save('api', result)}")


if __name__ == "__main__":
    main()
