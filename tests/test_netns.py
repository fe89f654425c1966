"""Across real interfaces: each node in its own network namespace on a bridge; the workers find the
coordinator by mDNS alone (no address given), generation matches one machine, and a worker cut off
the network is noticed and planned around."""

import json
import subprocess
import sys
import textwrap

import pytest
from moemesh.launch import LocalCluster
from hf_reference import build_checkpoint, make_config
from netns import NetnsLab, unavailable

import moemesh

pytestmark = [pytest.mark.netns, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

CLIENT = textwrap.dedent("""
    import json, sys, time
    import moemesh
    target, prompt, n, nodes = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    model = moemesh.connect(target, timeout=60)
    deadline = time.monotonic() + 120
    while True:
        s = model.status()
        if s.state == "ready" and sum(x.state == "serving" for x in s.nodes) == nodes:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.5)
    tokens = model.generate(prompt, max_new_tokens=n)
    s = model.status()
    print(json.dumps({"tokens": tokens, "nodes": {x.info.name: [x.state, x.info.host or ""] for x in s.nodes},
                      "plan": json.loads(s.plan_json)}))
""")


@pytest.fixture
def net():
    net = NetnsLab(3)
    yield net
    net.close()


def client(net: NetnsLab, target: str, prompt: list[int], n: int, nodes: int) -> dict:
    out = subprocess.run([*net.exec_prefix(0), sys.executable, "-c", CLIENT, target, json.dumps(prompt), str(n),
                          str(nodes)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mdns_discovery_and_partition_across_namespaces(net, tmp_path):
    ckpt = tmp_path / "ckpt"
    build_checkpoint(ckpt, make_config(num_hidden_layers=4), seed=5)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    single = moemesh.load(ckpt, dtype="float32")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = single.generate(prompt, max_new_tokens=16)

    host = net.addresses[0]
    cluster = LocalCluster(ckpt, 0, tmp_path, ["--split", "even", "--dtype", "float32", "--expect", "2"],
                           mdns=True, prefix=net.exec_prefix(0), host=host)
    try:
        for i in (1, 2):  # no --coordinator: found by mDNS over the bridge
            cluster.add_worker(f"w{i}", mdns_args=["--mdns-interface", net.addresses[i]], prefix=net.exec_prefix(i),
                               host=net.addresses[i])
        result = client(net, cluster.target, prompt, 16, nodes=2)
        assert result["tokens"] == expected
        assert sorted(s["lead"] for s in result["plan"]["stages"]) == ["w1", "w2"]
        log = cluster.log("coordinator")
        assert "joined from 198.18.0.11" in log and "joined from 198.18.0.12" in log
        assert "looking for a coordinator" in cluster.log("w1")

        net.partition(2)  # w2 drops off the network, its process still running
        result = client(net, cluster.target, prompt, 16, nodes=1)
        assert result["tokens"] == expected
        assert result["nodes"]["w2"][0] == "lost"
        assert [s["lead"] for s in result["plan"]["stages"]] == ["w1"]
    finally:
        cluster.close()
