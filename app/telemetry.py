"""Device samples, one a second: this machine's GPUs (NVML) or its CPU ranks (psutil, estimated power),
and the joined agents' devices through their signed metrics call. Samples go to the store, where the
GPUs tab plots them and the cost of each request integrates their power.
"""

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from . import costs, inventory
from .client import AgentRefused, AgentUnreachable
from .launch import LocalCluster
from .serving import describe_error
from .store import Sample, Store, StoreError

DOWNSAMPLE_EVERY = 300  # sampler ticks


@dataclass
class Sources:
    """What the sampler reads besides the machine itself (the supervisor's current state)."""

    engine: Callable[[], object | None]  # the running Engine (app/supervisor.py), None while none runs
    host: Callable[[], object | None]  # the Host that discovers agents, None before start
    is_local: Callable[[object], bool]  # whether an agent's advert is this machine's own agent
    each_tick: Callable[[int], None] = lambda tick: None  # the supervisor's periodic checks


class Telemetry:
    def __init__(self, store: Store, node: str, period_s: float, sources: Sources):
        self.store, self.node, self.period_s, self.sources = store, node, period_s, sources
        self.problem = ""  # the sampler's last error, shown in the UI rather than lost
        self.version = 0  # bumped on every sample written
        self.gpu_names: dict[int, tuple[str, float]] = {}  # index -> (name, memory MB)
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmd-sampler", daemon=True)

    def start(self) -> None:
        for g in inventory.read_inventory().gpus:
            self.gpu_names[g.index] = (g.name, float(g.memory_total_mb))
            self.store.upsert_gpu(self.node, f"cuda:{g.index}", g.name, g.memory_total_mb)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def sample_now(self) -> None:
        with self._lock:  # psutil measures CPU time between two reads of the same process
            self.store.add_samples(self.local_samples(time.time()))
            self.version += 1

    def _loop(self) -> None:
        tick = 0
        while not self._closing.wait(self.period_s):
            try:
                self.sample_now()
                self.store.add_samples(self.peer_samples(time.time()))
                self.problem = ""
                self.sources.each_tick(tick)
                if tick % DOWNSAMPLE_EVERY == DOWNSAMPLE_EVERY - 1:
                    self.store.downsample()
            except (StoreError, OSError, psutil.Error) as e:  # shown on the page; the next tick tries again
                self.problem = f"sampler: {describe_error(e)}"
            tick += 1

    def local_samples(self, now: float) -> list[Sample]:
        return self._gpu_samples(now) if self.gpu_names else self._cpu_samples(now)

    def _gpu_samples(self, now: float) -> list[Sample]:
        out = []
        for g in inventory.read_gpu_samples():
            _, total = self.gpu_names.get(g["index"], ("", 0.0))
            out.append(Sample(now, self.node, f"cuda:{g['index']}", float(g["utilization_pct"] or 0),
                              float(g["memory_used_mb"] or 0), total, g["power_w"], g["temperature_c"]))
        return out

    def rank_processes(self) -> dict[int, psutil.Process]:
        """Rank -> process of each CPU rank on this machine: this process is rank 0."""
        pids = {0: os.getpid()}
        engine = self.sources.engine()
        if engine is not None and isinstance(engine.cluster, LocalCluster):
            pids.update({rank: p.pid for rank, p in enumerate(engine.cluster.procs, start=1)})
        self._procs = {pid: self._procs.get(pid) or psutil.Process(pid) for pid in pids.values()}
        return {rank: self._procs[pid] for rank, pid in pids.items()}

    def _cpu_samples(self, now: float) -> list[Sample]:
        engine = self.sources.engine()
        cores = os.cpu_count() or 1
        threads = engine.spec.threads if engine else cores
        tdp = self.store.settings().cpu_tdp_w * min(threads / cores, 1.0)
        ram = psutil.virtual_memory().total / inventory.MB
        temperature = inventory.cpu_temperature_c()
        out = []
        for rank, proc in self.rank_processes().items():
            reading = inventory.read_process_sample(proc)
            if reading is None:
                continue
            util = min(reading.cpu_pct / threads, 100.0)
            out.append(Sample(now, self.node, f"cpu:{rank}", util, reading.rss_mb, ram,
                              costs.cpu_power_w(util, tdp), temperature, power_estimated=True))
        return out

    def peer_samples(self, now: float) -> list[Sample]:
        """Joined agents on other machines report their GPUs (or CPU) through their signed metrics call."""
        host = self.sources.host()
        if host is None:
            return []
        out = []
        for s in host.peers():
            if not s.joined or s.health != "ok" or self.sources.is_local(s.peer.advert):
                continue
            try:
                m = host.client(s.peer, timeout_s=1.0).get("/v1/metrics")
            except (AgentUnreachable, AgentRefused):
                continue  # the heartbeat marks it lost
            out += metric_samples(now, s.peer.advert.name, m, self.store.settings().cpu_tdp_w)
        return out


def metric_samples(now: float, node: str, metrics: dict, tdp_w: float) -> list[Sample]:
    """An agent's `/v1/metrics` answer as samples: one per GPU, else one for its CPU (estimated power)."""
    gpus = metrics.get("gpus") or []
    if gpus:
        return [Sample(now, node, f"cuda:{g['index']}", float(g["utilization_pct"] or 0),
                       float(g["memory_used_mb"] or 0), float(g.get("memory_total_mb") or 0), g["power_w"],
                       g["temperature_c"]) for g in gpus]
    util = float(metrics.get("cpu_pct") or 0.0)
    return [Sample(now, node, "cpu", util, 0.0, 0.0, costs.cpu_power_w(util, tdp_w), None, power_estimated=True)]
