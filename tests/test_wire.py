"""The wire: stubs current with the .proto, tensor codec, versions, discovery on the loopback."""

import asyncio

import pytest
import torch

from moemesh.transport import moemesh_pb2 as pb
from moemesh.transport.codegen import HERE, PROTO, file_descriptor, generate, grpc_methods
from moemesh.transport.discovery import Discovery
from moemesh.transport.wire import PROTOCOL_VERSION, ProtocolError, peer_host, tensor_from, tensor_msg, version_problem
from moemesh.spec.units import seconds, size_bytes


def test_checked_in_stubs_are_generated_from_the_proto(tmp_path):
    # What the stubs define, not the generator's version strings: any grpcio-tools release gives the same.
    generate(tmp_path)
    regenerate = "regenerate the stubs: python -m moemesh.transport.codegen"
    assert file_descriptor(tmp_path) == file_descriptor(HERE), regenerate
    assert grpc_methods(tmp_path) == grpc_methods(HERE), regenerate
    assert len(grpc_methods(HERE)) == sum(len(s.method) for s in file_descriptor(HERE).service) > 0


def test_stub_comparison_sees_a_changed_proto(tmp_path):
    for change in (("bytes data = 3;", "bytes data = 3;\n  bool pinned = 4;"),
                   ("rpc Echo(EchoMessage) returns (EchoMessage);", "rpc Echo(EchoMessage) returns (stream EchoMessage);")):
        (tmp_path / PROTO.name).write_text(PROTO.read_text().replace(*change))
        generate(tmp_path, tmp_path / PROTO.name)
        assert (file_descriptor(tmp_path), grpc_methods(tmp_path)) != (file_descriptor(HERE), grpc_methods(HERE)), change


@pytest.mark.parametrize("t", [torch.randn(3, 5).bfloat16(), torch.randn(2, 7), torch.arange(6).view(2, 3),
                               torch.randn(4).half(), torch.empty(0, 8)])
def test_tensor_codec_round_trip(t):
    assert torch.equal(tensor_from(pb.Tensor.FromString(tensor_msg(t).SerializeToString())), t)


def test_malformed_tensors_are_refused():
    with pytest.raises(ProtocolError, match="unknown dtype 'complex7'"):
        tensor_from(pb.Tensor(dtype="complex7", shape=[1], data=b"1234"))
    with pytest.raises(ProtocolError, match=r"received 3 bytes for a float32 tensor of shape \[2\]"):
        tensor_from(pb.Tensor(dtype="float32", shape=[2], data=b"abc"))


def test_version_problem_names_both_versions():
    peer = pb.NodeInfo(protocol_version=PROTOCOL_VERSION + 1, name="gpu-box", software_version="9.9")
    problem = version_problem(peer, "coordinator home")
    assert f"protocol {PROTOCOL_VERSION + 1}" in problem and f"protocol {PROTOCOL_VERSION}" in problem
    assert "gpu-box" in problem and "9.9" in problem
    assert version_problem(pb.NodeInfo(protocol_version=PROTOCOL_VERSION), "x") is None


def test_peer_host():
    assert peer_host("ipv4:198.18.0.2:5123") == "198.18.0.2"
    assert peer_host("ipv6:[::1]:5123") == "::1"


def test_units():
    assert seconds("30s") == 30 and seconds("2m") == 120 and seconds("1.5") == 1.5
    assert size_bytes("8GB") == 8e9 and size_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        size_bytes("lots")


def test_discovery_finds_and_loses_a_node_on_loopback():
    async def run():
        a, b = Discovery(["127.0.0.1"]), Discovery(["127.0.0.1"])
        found, lost = asyncio.Event(), asyncio.Event()
        seen = []
        b.watch(lambda x: x.role == "worker" and x.properties.get("cluster") == "lab",
                lambda x: (seen.append(x), found.set()), lambda name: lost.set())
        await a.advertise("worker-test", 5123, {"role": "worker", "cluster": "lab", "node_id": "n1"})
        other = Discovery(["127.0.0.1"])  # another cluster on the same LAN is not seen
        await other.advertise("worker-other", 5124, {"role": "worker", "cluster": "elsewhere"})
        await asyncio.wait_for(found.wait(), 10)
        await a.close()
        await asyncio.wait_for(lost.wait(), 10)
        await other.close()
        await b.close()
        return seen

    seen = asyncio.run(run())
    assert [(s.port, s.node_id, s.addresses) for s in seen] == [(5123, "n1", ["127.0.0.1"])]
