"""Showing a plan: rich tables for the terminal and a hand-written SVG."""

from __future__ import annotations

from html import escape

from rich.table import Table

from .cluster import Reference
from ..spec.units import fmt_bytes
from .plan import Plan
from .strategies import Row


def _layers(plan: Plan, name: str) -> str:
    spans = plan.layers_of(name)
    return ", ".join(f"{a}-{b - 1}" for a, b in spans) or "-"


def nodes_table(plan: Plan) -> Table:
    moe_layers = max(1, len(plan.experts))
    t = Table(title=f"{plan.strategy}: {plan.tokens_per_s:.2f} tokens/s predicted ({plan.ms_per_token:.1f} ms/token)")
    for col, just in [("node", "left"), ("role", "left"), ("layers", "left"), ("experts/layer", "right"),
                      ("used/budget GB", "right"), ("free GB", "right"), ("busy ms/tok", "right")]:
        t.add_column(col, justify=just)
    for n in plan.nodes:
        experts = f"{n.expert_slots / moe_layers:.1f}" if n.expert_slots else "-"
        t.add_row(f"{n.name} ({n.backend})", n.role, _layers(plan, n.name), experts,
                  f"{n.memory_used / 1e9:.1f}/{n.memory_budget / 1e9:.1f}", f"{n.memory_free / 1e9:.1f}",
                  f"{n.busy_ms:.1f}")
    return t


def stages_table(plan: Plan) -> Table:
    t = Table(title="pipeline (the token visits the stages in this order, then returns to the head)")
    for col in ("stage", "layers", "lead", "expert nodes", "ms/token"):
        t.add_column(col)
    for i, s in enumerate(plan.stages):
        t.add_row(str(i), f"{s.start}-{s.end - 1}", s.lead, ", ".join(s.nodes) if s.helpers else s.lead, f"{s.ms:.1f}")
    return t


def summary_lines(plan: Plan) -> list[str]:
    m = plan.model
    lines = [f"model: {m['layers']} layers ({m['moe_layers']} MoE, {m['experts']} experts, top-{m['top_k']}), "
             f"{m['weight_format']} weights {fmt_bytes(m['weight_bytes'])}, "
             f"{fmt_bytes(m['read_bytes_per_token'])} read per token; KV room for {plan.context} tokens",
             f"search: {plan.method}"]
    b = plan.balancedness()
    if b is None:
        lines.append("expert balancedness: n/a (every layer's experts on one node)")
    else:
        lines.append(f"expert balancedness over {len(plan.expert_parallel_layers())} expert-parallel layers: "
                     f"{b[0]:.3f} in id order -> {b[1]:.3f} placed (1.0 = every node busy for the same time)")
    return lines + plan.notes


def reference_lines(plan: Plan, ref: Reference, baseline: Plan | None) -> list[str]:
    ttft = f", {ref.time_to_first_token_s} s to first token" if ref.time_to_first_token_s is not None else ""
    lines = [f"published measurement ({ref.source}): {ref.tokens_per_s} tokens/s{ttft}"
             + (f" [{ref.model}, {ref.quant}]" if ref.model or ref.quant else ""),
             f"this plan predicts: {plan.tokens_per_s:.2f} tokens/s ({plan.tokens_per_s / ref.tokens_per_s:.2f}x the "
             f"measurement); time to first token is not predicted"]
    if baseline is not None:
        lines.append(f"the same model predicts {baseline.tokens_per_s:.2f} tokens/s for {baseline.strategy}: "
                     f"measured/predicted = {ref.tokens_per_s / baseline.tokens_per_s:.2f} "
                     f"(what that runtime achieved of this cost model)")
    if ref.quant and ref.quant != plan.quant:
        lines.append(f"note: the measurement used {ref.quant}, this plan {plan.quant}")
    if ref.note:
        lines.append(f"note: {ref.note}")
    return lines


def compare_table(rows: list[Row]) -> Table:
    t = Table(title="strategies on the same model, cluster and cost model")
    for col, just in [("strategy", "left"), ("tokens/s", "right"), ("ms/token", "right"),
                      ("nodes used", "right"), ("balancedness (id order -> placed)", "right"), ("", "left")]:
        t.add_column(col, justify=just)
    for r in rows:
        if r.plan is None:
            t.add_row(r.strategy, "-", "-", "-", "-", f"does not fit: {r.error}")
            continue
        b = r.plan.balancedness()
        used = sum(n.role != "unused" for n in r.plan.nodes)
        t.add_row(r.strategy, f"{r.plan.tokens_per_s:.2f}", f"{r.plan.ms_per_token:.1f}", str(used),
                  "1 node per layer" if b is None else f"{b[0]:.3f} -> {b[1]:.3f}", "")
    return t


def _heat(x: float) -> str:
    """White (no load) through orange to dark red (all of the layer's load)."""
    x = min(max(x, 0.0), 1.0)
    r, g, b = 255 - int(80 * x), 255 - int(200 * x), 255 - int(235 * x)
    return f"rgb({r},{g},{b})"


def svg(plan: Plan) -> str:
    """Nodes as columns, layers as bands; a cell's colour is the node's share of that layer's
    routed-expert load (dense work for dense layers); a dark bar marks the stage's lead."""
    col_w, row_h, left, top = 130, 9, 48, 78
    n_layers = plan.model["layers"]
    width, height = left + col_w * len(plan.nodes) + 10, top + row_h * n_layers + 30
    share = {(l.layer, n): 0.0 for l in plan.experts for n in (x.name for x in plan.nodes)}
    for l in plan.experts:
        for e, reps in enumerate(l.replicas):
            for node, frac in reps:
                share[(l.layer, node)] += l.load[e] * frac
    lead_of = {layer: s.lead for s in plan.stages for layer in range(s.start, s.end)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="18" font-size="14">{escape(plan.cluster or "cluster")}: '
           f'{plan.tokens_per_s:.2f} tokens/s predicted, {plan.quant}</text>']
    for c, n in enumerate(plan.nodes):
        x = left + c * col_w
        out.append(f'<text x="{x + 4}" y="40">{escape(n.name)} ({escape(n.role)})</text>')
        out.append(f'<text x="{x + 4}" y="54" fill="#555">{fmt_bytes(n.memory_used)} / {fmt_bytes(n.memory_budget)}'
                   f'</text>')
        out.append(f'<text x="{x + 4}" y="68" fill="#555">{n.busy_ms:.1f} ms busy</text>')
        for layer in range(n_layers):
            y = top + layer * row_h
            load = share.get((layer, n.name), 1.0 if lead_of.get(layer) == n.name else 0.0)
            out.append(f'<rect x="{x}" y="{y}" width="{col_w - 4}" height="{row_h - 1}" fill="{_heat(load)}" '
                       f'stroke="#eee"><title>layer {layer}, {escape(n.name)}: {load:.1%} of expert load</title></rect>')
            if lead_of.get(layer) == n.name:
                out.append(f'<rect x="{x}" y="{y}" width="5" height="{row_h - 1}" fill="#223"/>')
    for layer in range(0, n_layers, 5):
        out.append(f'<text x="8" y="{top + layer * row_h + row_h - 1}" fill="#555">L{layer}</text>')
    out.append(f'<text x="8" y="{height - 10}" fill="#555">dark bar: stage lead (attention, shared experts, KV); '
               f'colour: share of the layer\'s routed-expert load</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
