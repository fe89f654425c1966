// The dashboard: reads /api/events (a snapshot of the cluster every second, as server-sent events) and draws
// it; the chat box streams from /v1/chat/completions. fetch() rather than EventSource, so that an API key can
// ride in the Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("moemesh-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("moemesh-key", keyInput.value); connect(); });
let model = null;
const history = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h.Authorization = "Bearer " + keyInput.value;
  return h;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return n.toFixed(n < 10 && i ? 1 : 0) + " " + units[i];
}

function ranges(layers) {
  const out = [];
  for (let i = 0; i < layers.length; i++) {
    let j = i;
    while (j + 1 < layers.length && layers[j + 1] === layers[j] + 1) j++;
    out.push(i === j ? `${layers[i]}` : `${layers[i]}-${layers[j]}`);
    i = j;
  }
  return out.join(",") || "-";
}

// Server-sent events over fetch: calls onEvent with each `data:` payload (parsed JSON, or the raw "[DONE]").
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        onEvent(data === "[DONE]" ? data : JSON.parse(data));
      }
    }
  }
}

let events = null;  // the AbortController of the current /api/events stream
async function connect() {
  if (events) events.abort();
  events = new AbortController();
  const mine = events;
  try {
    const r = await fetch("/api/events", { headers: headers(), signal: mine.signal });
    if (r.status === 401) { $("state").textContent = "API key needed"; return; }
    await readEvents(r, render);
  } catch (e) {
    if (mine.signal.aborted) return;
  }
  setTimeout(() => { if (events === mine) connect(); }, 2000);  // the server went away: try again
}

function render(s) {
  model = s.model;
  $("model").textContent = s.model + (s.coordinator ? " on " + s.coordinator : "");
  $("state").textContent = s.state;
  $("state").className = "badge " + s.state;
  $("waiting").textContent = s.waiting_for ? "not ready: " + s.waiting_for : "";
  $("tps").textContent = s.tokens_per_s.toFixed(1);
  $("pred").textContent = s.predicted_tokens_per_s ? s.predicted_tokens_per_s.toFixed(1) : "–";
  $("ttft").textContent = s.ttft_ms_median == null ? "–" : s.ttft_ms_median.toFixed(0) + " ms";
  $("mtp").textContent = s.speculative || s.draft_acceptance
    ? (100 * s.draft_acceptance).toFixed(0) + "%" : "off";
  $("active").textContent = s.active_requests + (s.api_waiting ? ` (+${s.api_waiting} waiting)` : "");
  $("step").textContent = s.step_ms_median ? `${s.step_ms_median.toFixed(1)} / ${s.hop_ms_median.toFixed(2)} ms` : "–";
  renderRing(s);
  renderPlan(s);
  renderHeatmap(s.heatmap);
}

function renderRing(s) {
  const ring = $("ring");
  const cards = [`<div class="node head"><div class="name">${s.coordinator || "head"}</div>
    <div class="row">embeddings, head${s.speculative ? ", MTP" : ""}</div>
    <div class="row">${s.active_requests} request(s)</div></div>`];
  const first = (n) => (n.layers.length ? Math.min(...n.layers) : Infinity);
  for (const n of [...s.nodes].sort((a, b) => first(a) - first(b))) {  // in ring order
    const total = Math.max(n.memory_free, n.weight_bytes + n.kv_bytes, 1);
    const isa = n.cpu_isa ? ` (${n.cpu_isa})` : "";
    cards.push(`<div class="arrow">→</div><div class="node" data-node="${n.name}">
      <span class="state">${n.state}</span><div class="name">${n.name}</div>
      <div class="row"><b>${n.backend}/${n.device}</b>${isa}</div>
      <div class="mem" title="weights ${bytes(n.weight_bytes)}, KV ${bytes(n.kv_bytes)} of ${bytes(total)}">
        <div class="w" style="width:${100 * n.weight_bytes / total}%"></div>
        <div class="kv" style="width:${Math.max(100 * n.kv_bytes / total, n.kv_bytes ? 1 : 0)}%"></div></div>
      <div class="row">${bytes(n.weight_bytes + n.kv_bytes)} used of ${bytes(total)}</div>
      <div class="row">layers <b>${ranges(n.layers)}</b> · experts <b>${n.experts}</b></div>
      <div class="row">RTT <b>${n.rtt_ms.toFixed(2)} ms</b> · busy <b>${n.busy_ms.toFixed(1)} ms</b>/step</div>
    </div>`);
  }
  if (s.nodes.length > 1 || s.coordinator !== "local") cards.push(`<div class="arrow">↩</div>`);
  ring.innerHTML = cards.join("");
}

function renderPlan(s) {
  const p = s.plan;
  if (!p || !p.stages) { $("plan").innerHTML = s.nodes.length ? "one machine: every layer here" : "no plan yet"; return; }
  const scale = Math.max(p.tokens_per_s, s.tokens_per_s, 1e-9);
  const layers = (st) => (st.end - st.start > 1 ? `layers ${st.start}-${st.end - 1}` : `layer ${st.start}`);
  const stages = p.stages.map((st) => `<tr><td>${layers(st)}</td><td><b>${st.lead}</b>` +
    (st.helpers.length ? ` + ${st.helpers.join(", ")}` : "") + `</td><td>${st.ms.toFixed(2)} ms/token</td></tr>`);
  $("plan").innerHTML = `<table>
    <tr><td>predicted</td><td style="width:240px"><div class="bar pred" style="width:${100 * p.tokens_per_s / scale}%"></div></td>
        <td>${p.tokens_per_s.toFixed(1)} tokens/s</td></tr>
    <tr><td>measured</td><td><div class="bar" style="width:${100 * s.tokens_per_s / scale}%"></div></td>
        <td>${s.tokens_per_s.toFixed(1)} tokens/s</td></tr></table>
    <table style="margin-top:8px">${stages.join("")}</table>
    <div>weights ${p.quant}${p.method ? ", planned by " + p.method : ""}</div>`;
}

function renderHeatmap(h) {
  const grid = $("heatmap");
  const shape = `${h.layers.join(",")}x${h.experts}`;
  if (grid.dataset.shape !== shape) {  // rebuilt only when the layers or experts change; cells recoloured in place
    grid.dataset.shape = shape;
    grid.style.gridTemplateColumns = `40px repeat(${h.experts}, 1fr)`;
    grid.innerHTML = h.layers.map((layer) => `<div class="lab">L${layer}</div>` +
      `<div class="cell"></div>`.repeat(h.experts)).join("");
  }
  $("heatnote").textContent = h.layers.length ? "(tokens routed to each expert; each row scaled to its busiest)" : "(no routing counted yet)";
  const rows = grid.querySelectorAll(".lab");
  h.counts.forEach((counts, i) => {
    const peak = Math.max(...counts, 1);
    let cell = rows[i].nextElementSibling;
    counts.forEach((c, e) => {
      const t = c / peak;
      cell.style.background = `rgba(229, 83, 75, ${0.08 + 0.92 * t})`;
      cell.title = `layer ${h.layers[i]}, expert ${e}: ${c} tokens`;
      cell = cell.nextElementSibling;
    });
  });
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  $("send").disabled = true;
  const started = performance.now();
  let first = 0, answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model, messages: history, stream: true, max_tokens: 128,
                             stream_options: { include_usage: true } }),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    await readEvents(r, (e) => {
      if (e === "[DONE]") return;
      if (e.error) throw new Error(e.error.message);
      const delta = e.choices.length ? e.choices[0].delta.content : null;
      if (delta) {
        if (!first) first = performance.now();
        answer += delta;
        out.textContent = answer;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (e.usage) {
        const decode = (performance.now() - first) / 1000;
        $("chatstats").textContent = `${e.usage.completion_tokens} tokens, first after ${(first - started).toFixed(0)} ms, ` +
          `${decode > 0 ? ((e.usage.completion_tokens - 1) / decode).toFixed(1) : "–"} tokens/s`;
      }
    });
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    out.className = "msg error";
    out.textContent = "error: " + e.message;
    history.pop();
  } finally {
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || !model) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
connect();
