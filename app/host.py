"""The host: finds agents over mDNS, keeps a live peer table, and runs one engine
across the joined agents' devices with rank 0 (the driver) in its own process."""

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmd.engine.balancer import BalancerConfig
from llmd.engine.errors import LlmdError, WorkerLost
from llmd.engine.worker import RankSpec

from .client import AgentClient, AgentRefused, AgentUnreachable
from .discovery import Browser, Peer, open_zeroconf
from .launch import Cluster
from .models import ModelServer
from .options import EngineOptions

HEARTBEAT_S = 1.0
LOST_AFTER_S = 3.0


class NoAgents(LlmdError): ...


@dataclass
class PeerStatus:
    peer: Peer
    joined: bool = False
    health: str = "unknown"  # ok | refused (another pool's secret) | unreachable | lost
    last_ok: float = 0.0
    error: str = ""

    def to_dict(self) -> dict:
        return {**self.peer.to_dict(), "joined": self.joined, "health": self.health, "error": self.error}


@dataclass
class Host:
    """The peer table: mDNS adds and removes peers; signed heartbeats say whether they answer."""

    secret: str | None  # None: list peers without asking them anything
    address: str | None = None  # the LAN address to browse on (None: every interface)
    table: dict[str, PeerStatus] = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.zc = open_zeroconf(self.address)
        self.browser = Browser(self.zc)
        self._thread = threading.Thread(target=self._heartbeats, name="llmd-heartbeats", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.browser.close()
        self.zc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def client(self, peer: Peer, timeout_s: float = 10.0) -> AgentClient:
        return AgentClient(peer.advert.address, peer.advert.port, self.secret, peer.advert.agent_id, timeout_s)

    def _heartbeats(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.refresh()

    def refresh(self) -> None:
        """Merge what mDNS says with one signed health check per peer."""
        for peer in self.browser.snapshot():
            with self._lock:
                status = self.table.setdefault(peer.key, PeerStatus(peer))
                status.peer = peer
            if peer.state == "lost":
                status.health, status.error = "lost", "its mDNS record was removed"
                continue
            if self.secret is None:
                status.health = "unchecked (no pool secret)"
                continue
            try:
                self.client(peer, timeout_s=HEARTBEAT_S).get("/v1/health")
                status.health, status.last_ok, status.error = "ok", time.monotonic(), ""
            except AgentRefused as e:
                status.health, status.error = "refused", str(e)
            except AgentUnreachable as e:
                quiet = time.monotonic() - status.last_ok if status.last_ok else LOST_AFTER_S
                status.health, status.error = ("lost" if quiet >= LOST_AFTER_S else "unreachable"), str(e)

    def peers(self) -> list[PeerStatus]:
        with self._lock:
            return sorted(self.table.values(), key=lambda s: s.peer.advert.name)

    def wait_for_peers(self, count: int, timeout_s: float) -> list[PeerStatus]:
        """Wait until `count` peers answer signed health checks (or time runs out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            ok = [s for s in self.peers() if s.health == "ok"]
            if len(ok) >= count or time.monotonic() > deadline:
                return ok
            time.sleep(0.2)

    def join(self, name: str) -> PeerStatus:
        status = self._find(name)
        self.client(status.peer).get("/v1/health")  # refuses a peer of another pool, loudly
        status.joined = True
        return status

    def drop(self, name: str) -> PeerStatus:
        status = self._find(name)
        status.joined = False
        return status

    def _find(self, name: str) -> PeerStatus:
        for s in self.peers():
            if name in (s.peer.advert.name, s.peer.key, s.peer.advert.agent_id):
                return s
        raise NoAgents(f"no agent named {name!r} (known: {', '.join(s.peer.advert.name for s in self.peers())})")


@dataclass(frozen=True)
class Fetch:
    """What an agent's workers have fetched of their slices from this host, all together."""

    agent: str  # its control address
    bytes: int
    total: int
    rate: float  # bytes a second
    left_s: float | None


class RemoteCluster(Cluster):
    """Rank 0 here; ranks 1.. on the agents' devices, in the order given. The model's files are served to
    the agents that lack them (app/models.py) for as long as the engine runs, balancer moves included."""

    def __init__(self, spec: RankSpec, model: str, agents: list[tuple[AgentClient, list[str]]], address: str,
                 balancer: BalancerConfig | None = None):
        world = 1 + sum(len(devices) for _, devices in agents)
        super().__init__(spec, world, address, balancer)
        self.model, self.agents = model, agents
        self.rendezvous_key = agents[0][0].secret  # every agent gives it to its workers; it is never sent
        self._launched: list[AgentClient] = []
        self._owner: dict[int, str] = {}
        self.models: ModelServer | None = None
        self.fetches: dict[int, dict] = {}  # rank -> its worker's fetch progress, as its agent last said
        self.on_fetch: Callable[[list[Fetch]], None] | None = None

    def fetched(self) -> list[Fetch]:
        """Per agent, what its workers fetched of this launch's slices (none for an agent with the files)."""
        by_agent: dict[str, list[dict]] = {}
        for rank, f in sorted(self.fetches.items()):
            by_agent.setdefault(self._owner[rank], []).append(f)
        out = []
        for agent, fs in by_agent.items():
            done, total = sum(f["bytes"] for f in fs), sum(f["total"] for f in fs)
            rate = sum(f["rate"] for f in fs)
            out.append(Fetch(agent, done, total, rate, (total - done) / rate if rate > 0 else None))
        return out

    def start_other_ranks(self, address: str, port: int) -> None:
        self.models = ModelServer(address, self.rendezvous_key)
        source = asdict(self.models.offer(Path(self.spec.model_dir)))
        rank = 1
        for client, devices in self.agents:
            ranks = [{"rank": rank + i, "device": d} for i, d in enumerate(devices)]
            for r in ranks:
                self._owner[r["rank"]] = client.base
            rank += len(devices)
            client.post("/v1/launch", {
                "launch_id": self.launch_id, "master_addr": address, "master_port": port, "model": self.model,
                "ranks": ranks, **EngineOptions.of(self.spec).wire(), "source": source,
            }, timeout_s=max(600.0, self.spec.timeout_s))  # an agent with the files hashes them once, first
            self._launched.append(client)

    def check_workers(self) -> None:
        fetches = dict(self.fetches)
        for client in self._launched:
            try:
                workers = client.get("/v1/workers", timeout_s=5)["workers"]
            except (AgentUnreachable, AgentRefused) as e:
                raise WorkerLost(f"lost the agent at {client.base}: {e}") from None
            for w in workers:
                if w["launch_id"] == self.launch_id and w.get("fetch"):
                    self.fetches[w["rank"]] = w["fetch"]
                if w["launch_id"] == self.launch_id and not w["running"]:
                    why = f": {w['last_line']}" if w["last_line"] else ""
                    raise WorkerLost(f"worker rank {w['rank']} on {client.base} exited with code {w['exit_code']}{why}")

        if self.fetches != fetches:
            self.progress_at = time.monotonic()
            if self.on_fetch:
                self.on_fetch(self.fetched())

    def after_connect(self) -> None:
        super().after_connect()
        self.check_workers()  # every rank has loaded: its fetch's last word is in

    def stop_other_ranks(self) -> None:
        for client in self._launched:
            try:
                client.post("/v1/stop", {"launch_id": self.launch_id}, timeout_s=15)
            except LlmdError:
                pass  # the agent is gone; its workers die with their sockets
        if self.models is not None:
            self.models.close()
            self.models = None
