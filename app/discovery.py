"""Agents on the LAN, found over mDNS (`_llmd._tcp.local.`) with python-zeroconf."""

import socket
import threading
import time
from dataclasses import dataclass, field

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

SERVICE_TYPE = "_llmd._tcp.local."


@dataclass
class Advert:
    """What an agent says about itself in its TXT record."""

    agent_id: str
    name: str
    version: str
    devices: str  # a short summary, e.g. "cpu:2 (no GPU)" or "2x RTX 4090 24GB"
    device_count: int
    free_mb: int
    address: str
    port: int

    def properties(self) -> dict[str, str]:
        return {"id": self.agent_id, "name": self.name, "version": self.version, "devices": self.devices,
                "n": str(self.device_count), "free_mb": str(self.free_mb), "port": str(self.port)}

    @classmethod
    def from_info(cls, info: ServiceInfo) -> "Advert":
        p = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        return cls(agent_id=p.get("id", ""), name=p.get("name", info.name), version=p.get("version", "?"),
                   devices=p.get("devices", ""), device_count=int(p.get("n", "0") or 0),
                   free_mb=int(p.get("free_mb", "0") or 0), address=info.parsed_addresses()[0], port=info.port)


def open_zeroconf(address: str | None) -> Zeroconf:
    """Bind mDNS to the interface with `address` (None: all interfaces)."""
    if address:
        return Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    return Zeroconf(ip_version=IPVersion.V4Only)


class Advertiser:
    def __init__(self, zc: Zeroconf, advert: Advert):
        self.zc, self.advert = zc, advert
        self.info = self._info()

    def _info(self) -> ServiceInfo:
        a = self.advert
        return ServiceInfo(SERVICE_TYPE, f"{a.name}-{a.agent_id[:8]}.{SERVICE_TYPE}",
                           addresses=[socket.inet_aton(a.address)], port=a.port, properties=a.properties(),
                           server=f"llmd-{a.agent_id[:8]}.local.")

    def register(self) -> None:
        self.zc.register_service(self.info)

    def update(self, **changes) -> None:
        """Re-announce when something the host plans with (free memory) changes."""
        for k, v in changes.items():
            setattr(self.advert, k, v)
        self.info = self._info()
        self.zc.update_service(self.info)

    def unregister(self) -> None:
        self.zc.unregister_service(self.info)


@dataclass
class Peer:
    key: str  # the mDNS service name
    advert: Advert
    state: str = "discovered"  # discovered | lost
    last_seen: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict:
        return {"name": self.advert.name, "address": self.advert.address, "port": self.advert.port,
                "devices": self.advert.devices, "device_count": self.advert.device_count,
                "free_mb": self.advert.free_mb, "agent_id": self.advert.agent_id,
                "version": self.advert.version, "state": self.state}


class Browser:
    """A live table of the agents announced on the LAN."""

    def __init__(self, zc: Zeroconf, on_change=None):
        self.zc = zc
        self.peers: dict[str, Peer] = {}
        self.events: list[tuple[float, str, str]] = []  # (time, change, name)
        self._lock = threading.Lock()
        self._on_change = on_change
        self._browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._handle])

    def _handle(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                if name in self.peers:
                    self.peers[name].state = "lost"
            self._record("removed", name)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=2000)
        if info is None or not info.parsed_addresses():
            return
        with self._lock:
            self.peers[name] = Peer(name, Advert.from_info(info))
        self._record("added" if state_change is ServiceStateChange.Added else "updated", name)

    def _record(self, change: str, name: str) -> None:
        self.events.append((time.time(), change, name))
        if self._on_change:
            self._on_change(change, name)

    def snapshot(self) -> list[Peer]:
        with self._lock:
            return sorted(self.peers.values(), key=lambda p: p.advert.name)

    def wait_for(self, count: int, timeout_s: float) -> list[Peer]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [p for p in self.snapshot() if p.state != "lost"]
            if len(live) >= count:
                return live
            time.sleep(0.1)
        return [p for p in self.snapshot() if p.state != "lost"]

    def close(self) -> None:
        self._browser.cancel()
