"""Cluster files: units, validation messages, the shipped examples."""

import pytest

from moemesh.placement.cluster import ClusterError, cluster_from_dict, load_cluster
from moemesh.spec.units import parse_quantity
from test_placement_support import EXAMPLES


@pytest.mark.parametrize("text,kind,value", [
    ("64 GB", "bytes", 64e9), ("64GiB", "bytes", 64 * 2**30), (1024, "bytes", 1024),
    ("273 GB/s", "bytes/s", 273e9), ("10 Gbit/s", "bytes/s", 1.25e9), ("10Gbps", "bytes/s", 1.25e9),
    ("0.3 ms", "seconds", 3e-4), ("50 us", "seconds", 5e-5), ("8.5 TFLOPS", "flop/s", 8.5e12), ("1e12", "flop/s", 1e12),
])
def test_units(text, kind, value):
    assert parse_quantity(text, kind) == pytest.approx(value)


@pytest.mark.parametrize("text,kind", [("64 GB/s", "bytes"), ("fast", "bytes/s"), ("3 parsecs", "seconds"), (True, "bytes")])
def test_bad_units(text, kind):
    with pytest.raises(ValueError):
        parse_quantity(text, kind)


def minimal(**top):
    d = {"nodes": [{"name": "a", "memory": "16 GB", "bandwidth": "100 GB/s", "compute": "1 TFLOPS"}],
         "links": {"default": {"rtt": "1 ms", "bandwidth": "1 Gbit/s"}}}
    d.update(top)
    return d


def test_defaults_count_reserve_and_links():
    c = cluster_from_dict({
        "defaults": {"memory": "64 GB", "reserve": "8 GB", "bandwidth": "273 GB/s", "compute": "8 TFLOPS",
                     "backend": "mlx"},
        "nodes": [{"name": "box", "head": True, "memory": "128 GB"}, {"name": "mini", "count": 3}],
        "links": {"default": {"rtt": "0.2 ms", "bandwidth": "10 Gbit/s"},
                  "between": [{"nodes": ["box", "mini-2"], "rtt": "0.05 ms", "bandwidth": "40 Gbit/s"}]},
    })
    assert [n.name for n in c.nodes] == ["box", "mini-1", "mini-2", "mini-3"]
    assert c.head.name == "box" and c.nodes[1].memory == 56 * 10**9 and c.nodes[0].memory == 120 * 10**9
    assert c.link("mini-2", "box").rtt == pytest.approx(5e-5)
    assert c.link("mini-1", "mini-3").bandwidth == pytest.approx(1.25e9)
    assert [n.name for n in c.without("mini-2").nodes] == ["box", "mini-1", "mini-3"]


@pytest.mark.parametrize("change,message", [
    (lambda d: d["nodes"][0].pop("memory"), "field 'memory' is missing"),
    (lambda d: d["nodes"][0].update(bandwidth="fast"), "field 'bandwidth'"),
    (lambda d: d["nodes"][0].update(backend="tpu"), "field 'backend' is 'tpu'"),
    (lambda d: d["nodes"][0].update(memroy="1 GB"), "unknown field(s) memroy"),
    (lambda d: d["nodes"][0].update(count=0), "field 'count'"),
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), "repeated: a"),
    (lambda d: d.pop("links"), "field 'links'"),
    (lambda d: d["links"].update(between=[{"nodes": ["a", "zz"], "bandwidth": 1}]), "unknown node 'zz'"),
    (lambda d: d.update(reference={"source": "x", "tokens_per_s": "many"}), "tokens_per_s"),
])
def test_validation_names_file_and_field(tmp_path, change, message):
    import yaml

    d = minimal()
    change(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ClusterError) as e:
        load_cluster(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("nodes: [\n")
    with pytest.raises(ClusterError, match="not valid YAML"):
        load_cluster(path)


def test_examples_load():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        c = load_cluster(f)
        assert c.nodes and c.default_link.bandwidth > 0
    eight = load_cluster(EXAMPLES / "mac-mini-m4pro-x8.yaml")
    assert len(eight.nodes) == 8 and eight.reference.tokens_per_s == 5.37
    assert eight.reference.time_to_first_token_s == 2.91 and eight.nodes[0].bandwidth == 273e9
