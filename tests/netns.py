"""Test hosts in network namespaces of our own: one namespace per node, each with a veth into a bridge
that lives in a separate 'switch' namespace, addressed from 198.18.0.0/15 (set aside for test beds).
The machine's real interfaces and root namespace are never touched; everything is deleted afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"mmprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot create a network namespace here: {getattr(e, 'stderr', e)}"
    return None


class NetnsLab:
    def __init__(self, hosts: int):
        tag = f"{os.getpid() % 100000}"
        self.switch = f"mmsw{tag}"
        self.hosts = [f"mmh{tag}_{i}" for i in range(hosts)]
        self.addresses = [f"198.18.0.{10 + i}" for i in range(hosts)]
        self.links = [f"mmv{tag}_{i}" for i in range(hosts)]
        try:
            _ip("netns", "add", self.switch)
            _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("link", "set", "br0", "type", "bridge", "mcast_snooping", "0", ns=self.switch)  # flood mDNS
            _ip("link", "set", "br0", "up", ns=self.switch)
            for host, addr, link in zip(self.hosts, self.addresses, self.links):
                _ip("netns", "add", host)
                _ip("link", "set", "lo", "up", ns=host)
                _ip("link", "add", "eth0", "type", "veth", "peer", "name", link, ns=host)
                _ip("link", "set", link, "netns", self.switch, ns=host)
                _ip("link", "set", link, "master", "br0", ns=self.switch)
                _ip("link", "set", link, "up", ns=self.switch)
                _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=host)
                _ip("link", "set", "eth0", "up", ns=host)
                _ip("link", "set", "eth0", "multicast", "on", ns=host)
        except Exception:
            self.close()
            raise

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i]]

    def partition(self, i: int) -> None:
        """Cut host i off the switch (its process keeps running, unreachable)."""
        _ip("link", "set", self.links[i], "down", ns=self.switch)

    def close(self) -> None:
        for ns in [*self.hosts, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
