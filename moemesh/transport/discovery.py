"""Finding each other on a LAN with mDNS/DNS-SD (python-zeroconf, asyncio API).

Every node advertises `_moemesh._tcp.local.` with TXT properties (role, cluster, protocol version,
node id, backend, device, memory) and watches for the role it needs in its own cluster. Tests bind
to the loopback or to their own network namespaces via `interfaces`; nothing else is touched then.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import ifaddr
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_moemesh._tcp.local."


@dataclass
class Announcement:
    instance: str  # the mDNS instance name
    addresses: list[str]
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.properties.get("role", "")

    @property
    def node_id(self) -> str:
        return self.properties.get("node_id", "")


def local_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces, loopback last (used when no interface is named)."""
    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback) or ["127.0.0.1"]


class Discovery:
    def __init__(self, interfaces: list[str] | None = None):
        """interfaces: IPv4 addresses to use for mDNS (None: every interface)."""
        self.interfaces = interfaces
        self.zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only) if interfaces else \
            AsyncZeroconf(ip_version=IPVersion.V4Only)
        self.browsers: list[AsyncServiceBrowser] = []
        self.info: AsyncServiceInfo | None = None
        self.found: dict[str, Announcement] = {}
        self._tasks: set[asyncio.Task] = set()

    async def advertise(self, instance: str, port: int, properties: dict[str, str]) -> None:
        addresses = self.interfaces or [a for a in local_addresses() if not a.startswith("127.")] or ["127.0.0.1"]
        self.info = AsyncServiceInfo(SERVICE_TYPE, f"{instance[:60]}.{SERVICE_TYPE}", port=port,
                                     properties=properties, parsed_addresses=addresses)
        await (await self.zc.async_register_service(self.info, allow_name_change=True))  # returns a task to await

    async def update(self, properties: dict[str, str]) -> None:
        if self.info is not None:
            self.info = AsyncServiceInfo(SERVICE_TYPE, self.info.name, port=self.info.port, properties=properties,
                                         parsed_addresses=self.info.parsed_addresses())
            await (await self.zc.async_update_service(self.info))

    def watch(self, accept: Callable[[Announcement], bool], on_found: Callable[[Announcement], None],
              on_lost: Callable[[str], None] | None = None) -> None:
        """Call on_found for each announcement `accept`s (and again when it changes), on_lost(instance)."""

        def changed(zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                if self.found.pop(name, None) is not None and on_lost:
                    on_lost(name)
                return
            task = asyncio.ensure_future(self._resolve(name, accept, on_found))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.browsers.append(AsyncServiceBrowser(self.zc.zeroconf, SERVICE_TYPE, handlers=[changed]))

    async def _resolve(self, name: str, accept, on_found) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self.zc.zeroconf, 3000):
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items() if k}
        found = Announcement(name, info.parsed_addresses(IPVersion.V4Only), info.port or 0, props)
        if found.addresses and accept(found):
            self.found[name] = found
            on_found(found)

    async def close(self) -> None:
        for browser in self.browsers:
            await browser.async_cancel()
        if self.info is not None:
            await (await self.zc.async_unregister_service(self.info))  # goodbye packets: the others see us leave
        await self.zc.async_close()


async def find_coordinator(cluster: str, interfaces: list[str] | None = None, timeout: float = 10.0) -> str | None:
    """host:port of a coordinator of `cluster` announced on the network, or None."""
    discovery = Discovery(interfaces)
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_found(a: Announcement) -> None:
        if not found.done():
            found.set_result(f"{a.addresses[0]}:{a.port}")

    discovery.watch(lambda a: a.role == "coordinator" and a.properties.get("cluster") == cluster, on_found)
    try:
        return await asyncio.wait_for(found, timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        await discovery.close()
