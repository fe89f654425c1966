"""`GET /metrics` in Prometheus' text format. What the API sees itself (requests in flight and queued, time to
first token, inter-token latency) is counted as it happens; the rest is read at each scrape from what the
coordinator already knows (its status: per-node compute per step, link time per hop, KV-cache and weight bytes,
MTP drafts; its scheduler's totals; the workers' routing counts). One registry per server, not the global one."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..model.generate import GenerationStats
from ..spec.routing import RoutingStats
from ..transport import moemesh_pb2 as pb

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ClusterCollector:
    """Metric families from the last status, routing counts and scheduler totals handed to `Metrics.render`."""

    def __init__(self) -> None:
        self.status = pb.Status()
        self.routing = RoutingStats(0)
        self.served = GenerationStats()

    def describe(self) -> list:
        return []  # families are known only at scrape time (nodes and layers come and go)

    def collect(self) -> Iterator[Metric]:
        s, served = self.status, self.served
        yield GaugeMetricFamily("moemesh_ready", "1 while the cluster serves requests", value=float(s.state == "ready"))
        yield GaugeMetricFamily("moemesh_active_requests", "Requests in the scheduler (HTTP and gRPC)",
                                value=s.active_requests)
        yield CounterMetricFamily("moemesh_generated_tokens", "Tokens generated since start (HTTP and gRPC)",
                                  value=served.new_tokens)
        yield GaugeMetricFamily("moemesh_tokens_per_second", "Recent decode rate, all requests together",
                                value=s.tokens_per_s)
        yield GaugeMetricFamily("moemesh_predicted_tokens_per_second", "The plan's predicted decode rate",
                                value=s.predicted_tokens_per_s)
        yield CounterMetricFamily("moemesh_mtp_drafted", "MTP draft tokens verified since start", value=served.drafted)
        yield CounterMetricFamily("moemesh_mtp_accepted", "MTP draft tokens kept since start", value=served.accepted)
        yield GaugeMetricFamily("moemesh_mtp_acceptance_ratio", "MTP drafts kept over drafts verified, since start",
                                value=served.acceptance_rate)
        yield GaugeMetricFamily("moemesh_step_seconds", "A step's round trip around the ring, recent median",
                                value=s.step_ms_median / 1e3)
        link = GaugeMetricFamily("moemesh_link_seconds", "Link time per hop of a step (round trip less the nodes' "
                                 "compute, over the hops)", labels=["quantile"])
        link.add_metric(["0.5"], s.hop_ms_median / 1e3)
        link.add_metric(["0.99"], s.hop_ms_p99 / 1e3)
        yield link
        per_node = {
            "moemesh_node_compute_seconds": ("Compute per step on the node's own clock, recent median",
                                             lambda n: n.busy_ms / 1e3),
            "moemesh_node_rtt_seconds": ("Round trip coordinator to node, measured at join", lambda n: n.rtt_s),
            "moemesh_node_kv_cache_bytes": ("KV-cache bytes the node holds", lambda n: n.kv_bytes),
            "moemesh_node_weight_bytes": ("Weight bytes the node holds", lambda n: n.weight_bytes),
            "moemesh_node_memory_free_bytes": ("Memory the node offers for weights and KV cache",
                                               lambda n: n.info.memory_free),
        }
        for name, (text, value) in per_node.items():
            family = GaugeMetricFamily(name, text, labels=["node"])
            for n in s.nodes:
                family.add_metric([n.info.name], value(n))
            yield family
        experts = CounterMetricFamily("moemesh_expert_tokens", "Tokens routed to each expert of each MoE layer",
                                      labels=["layer", "expert"])
        for layer, counts in sorted(self.routing.layers.items()):
            for expert, count in enumerate(counts):
                experts.add_metric([str(layer), str(expert)], count)
        yield experts


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.in_flight = Gauge("moemesh_api_requests_in_flight", "HTTP requests generating", registry=r)
        self.queued = Gauge("moemesh_api_requests_queued", "HTTP requests waiting for the cluster to be ready",
                            registry=r)
        self.requests = Counter("moemesh_api_requests", "HTTP completion requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("moemesh_api_time_to_first_token_seconds", "From an HTTP request's arrival to its first "
                              "token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("moemesh_api_inter_token_latency_seconds", "Between consecutive tokens of an HTTP "
                             "request (tokens kept from one MTP step arrive together)", buckets=ITL_BUCKETS, registry=r)
        self.cluster = ClusterCollector()
        r.register(self.cluster)

    def render(self, status: pb.Status, routing: RoutingStats, served: GenerationStats) -> bytes:
        c = self.cluster
        c.status, c.routing, c.served = status, routing, served
        return generate_latest(self.registry)
