"""The wire: gRPC stubs generated from proto/moemesh.proto, tensor codec, versions, discovery."""
