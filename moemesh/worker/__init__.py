"""The worker lifecycle: `worker join` — announce, register, load a shard, run its part of every step."""
