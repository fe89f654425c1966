"""Cluster descriptions: nodes with memory, bandwidth and compute, and the links between them.

Built in code by the coordinator (`Cluster(nodes=[Node(...)], ...)`) or read from a YAML/JSON
file a user writes (`load_cluster`); see examples/clusters/ and docs/placement.md for the format.
Quantities are plain numbers in base units (bytes, bytes/s, flop/s, seconds) or strings with a
unit: "64 GB", "273 GB/s", "10 Gbit/s", "0.3 ms", "8.5 TFLOPS" (`moemesh.spec.units`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..spec.units import parse_quantity

BACKENDS = ("mlx", "cuda", "rocm", "cpu", "mps")


class ClusterError(ValueError):
    """A cluster description that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Node:
    name: str
    memory: int  # bytes this node may fill with weights and KV cache
    bandwidth: float  # measured memory bandwidth, bytes/s
    compute: float  # flop/s (dense matmul, the weights' compute precision)
    backend: str = "cpu"
    head: bool = False  # the coordinator: embeddings, final norm, lm_head, MTP


@dataclass(frozen=True)
class Link:
    rtt: float  # seconds, round trip of a small message (software stack included)
    bandwidth: float  # bytes/s

    def hop_seconds(self, nbytes: int) -> float:
        """One-way transfer: half a round trip plus serialization."""
        return self.rtt / 2 + nbytes / self.bandwidth


@dataclass(frozen=True)
class Reference:
    """A published measurement on this cluster, printed beside the prediction."""

    tokens_per_s: float
    source: str
    model: str = ""
    quant: str = ""
    time_to_first_token_s: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    default_link: Link
    links: dict[frozenset[str], Link] = field(default_factory=dict)  # pairs that differ from the default
    name: str = ""
    reference: Reference | None = None

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if not names:
            raise ClusterError("cluster: no nodes")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ClusterError(f"cluster: node names must be unique, repeated: {', '.join(dupes)}")
        if sum(n.head for n in self.nodes) > 1:
            raise ClusterError("cluster: more than one node has head: true")
        for pair in self.links:
            for n in pair:
                if n not in names:
                    raise ClusterError(f"cluster: link names unknown node '{n}'")

    @property
    def head(self) -> Node:
        """The coordinator: the node flagged `head`, else the first one."""
        return next((n for n in self.nodes if n.head), self.nodes[0])

    def link(self, a: str, b: str) -> Link:
        return self.links.get(frozenset((a, b)), self.default_link)

    def without(self, name: str) -> Cluster:
        """The cluster after node `name` leaves (the runtime re-plans with this)."""
        nodes = tuple(n for n in self.nodes if n.name != name)
        links = {p: l for p, l in self.links.items() if name not in p}
        return Cluster(nodes, self.default_link, links, self.name, self.reference)

    def with_node(self, node: Node) -> Cluster:
        """The cluster after `node` joins."""
        return Cluster(self.nodes + (node,), self.default_link, self.links, self.name, self.reference)


# ---- files -------------------------------------------------------------------------------------

_NODE_FIELDS = {"name", "memory", "reserve", "bandwidth", "compute", "backend", "head", "count", "note"}
_TOP_FIELDS = {"name", "nodes", "defaults", "links", "reference", "note"}


def _quantity(d: dict, key: str, kind: str, where: str, required: bool = True, default: float = 0.0) -> float:
    if key not in d or d[key] is None:
        if required:
            raise ClusterError(f"{where}: field '{key}' is missing")
        return default
    try:
        v = parse_quantity(d[key], kind)
    except ValueError as e:
        raise ClusterError(f"{where}: field '{key}': {e}") from None
    if v < 0 or (required and v == 0):
        raise ClusterError(f"{where}: field '{key}' must be positive, got {d[key]!r}")
    return v


def _link(d: Any, where: str) -> Link:
    if not isinstance(d, dict):
        raise ClusterError(f"{where}: expected a mapping with 'rtt' and 'bandwidth', got {d!r}")
    return Link(rtt=_quantity(d, "rtt", "seconds", where, required=False),
                bandwidth=_quantity(d, "bandwidth", "bytes/s", where))


def _nodes(raw: Any, defaults: dict, src: str) -> list[Node]:
    if not isinstance(raw, list) or not raw:
        raise ClusterError(f"{src}: field 'nodes' must be a non-empty list")
    nodes = []
    for i, entry in enumerate(raw):
        where = f"{src}: nodes[{i}]"
        if not isinstance(entry, dict):
            raise ClusterError(f"{where}: expected a mapping, got {entry!r}")
        unknown = set(entry) - _NODE_FIELDS
        if unknown:
            raise ClusterError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(sorted(_NODE_FIELDS))})")
        d = defaults | entry
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise ClusterError(f"{where}: field 'name' is missing or not a string")
        where = f"{src}: node '{name}'"
        backend = str(d.get("backend", "cpu"))
        if backend not in BACKENDS:
            raise ClusterError(f"{where}: field 'backend' is '{backend}', expected one of {', '.join(BACKENDS)}")
        memory = _quantity(d, "memory", "bytes", where) - _quantity(d, "reserve", "bytes", where, required=False)
        if memory <= 0:
            raise ClusterError(f"{where}: 'reserve' leaves no memory ({d.get('memory')!r} - {d.get('reserve')!r})")
        count = d.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ClusterError(f"{where}: field 'count' must be a positive integer, got {count!r}")
        head = d.get("head", False)
        if not isinstance(head, bool):
            raise ClusterError(f"{where}: field 'head' must be true or false, got {head!r}")
        if head and count > 1:
            raise ClusterError(f"{where}: a node with head: true cannot have count > 1")
        for k in range(count):
            nodes.append(Node(
                name=name if count == 1 else f"{name}-{k + 1}",
                memory=int(memory),
                bandwidth=_quantity(d, "bandwidth", "bytes/s", where),
                compute=_quantity(d, "compute", "flop/s", where),
                backend=backend,
                head=head,
            ))
    return nodes


def cluster_from_dict(d: Any, src: str = "cluster") -> Cluster:
    if not isinstance(d, dict):
        raise ClusterError(f"{src}: expected a mapping at the top level")
    unknown = set(d) - _TOP_FIELDS
    if unknown:
        raise ClusterError(f"{src}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_TOP_FIELDS))})")
    defaults = d.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ClusterError(f"{src}: field 'defaults' must be a mapping")
    bad = set(defaults) - (_NODE_FIELDS - {"name", "count", "head"})
    if bad:
        raise ClusterError(f"{src}: defaults: field(s) {', '.join(sorted(bad))} cannot have a default")
    nodes = _nodes(d.get("nodes"), defaults, src)

    links_raw = d.get("links")
    if not isinstance(links_raw, dict) or "default" not in links_raw:
        raise ClusterError(f"{src}: field 'links' must be a mapping with a 'default' link (rtt, bandwidth)")
    default = _link(links_raw["default"], f"{src}: links.default")
    pairs: dict[frozenset[str], Link] = {}
    for i, entry in enumerate(links_raw.get("between") or []):
        where = f"{src}: links.between[{i}]"
        ends = entry.get("nodes") if isinstance(entry, dict) else None
        if not (isinstance(ends, list) and len(ends) == 2 and ends[0] != ends[1]):
            raise ClusterError(f"{where}: field 'nodes' must name two different nodes")
        pairs[frozenset(ends)] = _link(entry, where)

    reference = None
    if d.get("reference") is not None:
        r = d["reference"]
        where = f"{src}: reference"
        if not isinstance(r, dict) or not r.get("source"):
            raise ClusterError(f"{where}: expected a mapping with 'source' and 'tokens_per_s'")
        try:
            ttft = r.get("time_to_first_token_s")
            reference = Reference(tokens_per_s=float(r["tokens_per_s"]), source=str(r["source"]),
                                  model=str(r.get("model", "")), quant=str(r.get("quant", "")),
                                  time_to_first_token_s=None if ttft is None else float(ttft),
                                  note=str(r.get("note", "")))
        except (KeyError, TypeError, ValueError):
            raise ClusterError(f"{where}: field 'tokens_per_s' must be a number") from None
    try:
        return Cluster(tuple(nodes), default, pairs, str(d.get("name", "")), reference)
    except ClusterError as e:
        raise ClusterError(f"{src}: {str(e).removeprefix('cluster: ')}") from None


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster description (YAML, or JSON which YAML also reads)."""
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"{p}: no such file")
    try:
        d = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ClusterError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({e})") from None
    return cluster_from_dict(d, str(p))
