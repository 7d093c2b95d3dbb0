"""The running pool as a typed service for the web UI: the peer table, the engine launched in the
background with its progress, chats served one at a time in arrival order, every request journalled
in the store, and one sample per device every second.

No Gradio here: `ui/` calls these methods and draws what they return.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.errors import LlmdError
from llmd.engine.partition import Device, plan_partition
from llmd.engine.presets import DEVICE_KINDS
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec

from . import costs, inventory
from .client import AgentRefused, AgentUnreachable
from .host import Host, NoAgents, RemoteCluster
from .keys import key_name
from .launch import Cluster, LocalCluster
from .serving import (Event, Failed, Finished, Limits, PoolNotReady, Reply, Request, Serving, Ticket, Token,  # noqa: F401 (the facade passes on the events)
                      describe_error)
from .store import Sample, Store, StoreError
from .text import TextModel


class PoolBusy(LlmdError): ...


# How far along a launch is when it enters each phase (the UI draws a bar from it).
PHASES = {"waiting": 0.0, "resolving the model": 0.05, "starting workers": 0.15, "loading shards": 0.3,
          "warming up": 0.8, "ready": 1.0}
DOWNSAMPLE_EVERY = 300  # sampler ticks
PEERS_EVERY = 5


@dataclass(frozen=True)
class Progress:
    phase: str = "waiting"  # a key of PHASES, or "failed" / "stopped"
    fraction: float = 0.0
    error: str = ""
    since: float = field(default_factory=time.time)  # when the current launch began

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def busy(self) -> bool:
        return self.phase not in ("waiting", "ready", "failed", "stopped")


@dataclass
class ChatSettings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    greedy: bool = False

    def sampling(self, stop_token_ids: list[int]) -> SamplingParams:
        return SamplingParams(max_new_tokens=int(self.max_new_tokens), greedy=self.greedy,
                              temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
                              stop_token_ids=stop_token_ids)


@dataclass(frozen=True)
class RankDevice:
    rank: int
    node: str
    device: str  # "cpu" or "cuda:N"


@dataclass
class Engine:
    """A launched engine: its driver runs chats once `cluster` is entered."""

    model: str
    text: TextModel
    spec: RankSpec
    cluster: Cluster
    devices: list[RankDevice]


@dataclass
class Setup:
    """What `Recipe.prepare` returns (the CLI's own `Setup` has these fields)."""

    spec: RankSpec
    world_size: int
    text: TextModel
    balancer: object | None = None  # engine.balancer.BalancerConfig, None: no balancing


@dataclass
class Recipe:
    """How to build an engine; the CLI supplies these so its option checks stay in one place."""

    model: str  # as the user gave it: "default", a directory or a .gguf file
    prepare: Callable[[int | None, bool], Setup]  # (world size, ranks 1.. on agents) -> resolved model and spec
    check_fit: Callable[[Setup, list[tuple[str, str, int]]], None]  # raises ModelDoesNotFit
    local: bool = False  # `llmd up`: every rank on this machine; `llmd host`: on the joined agents
    local_workers: int | None = None  # None: as many as the plan file has


@dataclass
class PoolConfig:
    node: str  # this machine's name in the pool
    address: str  # its LAN address: mDNS, the agents' control calls, the engine's rendezvous
    secret: str
    recipe: Recipe
    user: str = "web"
    sample_period_s: float = 1.0
    max_waiting: int = 32  # requests queued beyond the free KV slots before new ones are told "busy"


@dataclass
class Versions:
    """Bumped on every change, so a live view can check cheaply whether to redraw."""

    plan: int = 0
    requests: int = 0
    samples: int = 0
    settings: int = 0


class _Reports:
    """Reports launch phases from inside `Cluster.start` (rank 0 loads between these two hooks)."""

    report: Callable[[str], None]

    def start_other_ranks(self, address: str, port: int) -> None:
        self.report("starting workers")
        super().start_other_ranks(address, port)
        self.report("loading shards")

    def after_connect(self) -> None:
        super().after_connect()
        self.report("warming up")


class ReportingLocalCluster(_Reports, LocalCluster): ...


class ReportingRemoteCluster(_Reports, RemoteCluster): ...


@dataclass(frozen=True)
class Trimmed:
    """A chat's oldest turns were left out so that it fits the context: the first event of that reply."""

    turns: int  # messages left out
    prompt_tokens: int  # what the reply was asked with


def last_user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else ""


def planner_device(node: str, device: str, name: str = "") -> Device | None:
    """The planner's view of one rank's device: CPU from the kind table, a GPU when its name is known."""
    if device == "cpu":
        kind = DEVICE_KINDS["cpu"]
    else:
        simple = name.lower().replace(" ", "").replace("-", "")
        kind = next((k for k in DEVICE_KINDS.values() if k.name != "cpu" and k.name.replace("-", "") in simple), None)
        if kind is None:
            return None
    return Device(host=node, kind=kind.name, memory_gb=kind.memory_gb, bandwidth_gb_s=kind.bandwidth_gb_s,
                  tflops=kind.tflops)


def predict(cfg: ModelConfig, devices: list[Device], context: int, precision: str) -> dict:
    p = plan_partition(cfg, devices, precision=precision, context=context)
    return {**p.predicted, "prompt_tokens": 512, "weights_gb": [m.weights_gb for m in p.memory_per_device],
            "memory_gb": [m.total_gb for m in p.memory_per_device],
            "devices": [f"{d.host} {d.kind}" for d in devices]}


def _die_with_parent() -> None:
    """In the agent child: end with SIGTERM when `llmd up` dies, however it dies (Linux only)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Pool:
    """Use as a context manager, or call `close()`: it stops the agent child, the engine and the threads."""

    def __init__(self, store: Store, config: PoolConfig):
        self.store, self.config = store, config
        self.host: Host | None = None
        self.agent: subprocess.Popen | None = None
        self.engine: Engine | None = None
        self.progress = Progress()
        self.problem = ""  # the sampler's last error, shown in the UI rather than lost
        self.versions = Versions()
        self.serving: Serving | None = None  # the engine loop, once an engine is up
        self._closing = threading.Event()
        self._launch_thread: threading.Thread | None = None
        self._launch_lock = threading.Lock()
        self._procs: dict[int, psutil.Process] = {}
        self._sample_lock = threading.Lock()
        self._gpu_names: dict[int, tuple[str, float]] = {}
        self._local_agent_joined = False
        self._measured: list[dict] = []  # each rank's weights and peak memory, read once the engine is up
        self._sampler = threading.Thread(target=self._sample_loop, name="llmd-sampler", daemon=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- starting the parts

    def start(self, local_agent_devices: str | None = None, local_agent: bool = True) -> None:
        """The agent child first (before any thread of ours exists), then discovery and the sampler."""
        if local_agent:
            self.start_local_agent(local_agent_devices)
        self.host = Host(self.config.secret, self.config.address)
        self._read_gpus()
        self._sampler.start()

    def start_local_agent(self, devices: str | None) -> None:
        argv = [sys.executable, "-m", "llmd", "agent", "--name", self.config.node,
                "--address", self.config.address]
        if devices:
            argv += ["--devices", devices]
        env = dict(os.environ, LLMD_POOL_SECRET=self.config.secret)
        linux = sys.platform.startswith("linux")
        # `start` runs this before any thread of ours exists, which is what makes preexec_fn safe here.
        self.agent = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent if linux else None)

    def _read_gpus(self) -> None:
        for g in inventory.read_inventory().gpus:
            self._gpu_names[g.index] = (g.name, float(g.memory_total_mb))
            self.store.upsert_gpu(self.config.node, f"cuda:{g.index}", g.name, g.memory_total_mb)

    # ---- launching the engine in the background

    def launch_local(self) -> None:
        """`llmd up`: every rank on this machine."""
        self._launch(self._build_local)

    def launch_on_joined(self) -> None:
        """`llmd host`: rank 0 here, ranks 1.. on the joined agents' devices."""
        self._launch(self._build_remote)

    def relaunch(self) -> None:
        """Apply the Cluster tab's joins: over the joined agents when one on another machine is joined,
        else (`llmd up`) on this machine's workers again."""
        remote = [p for p in self.peers() if p["joined"] and not p["local"]]
        if self.config.recipe.local and not remote:
            self.launch_local()
        else:
            self.launch_on_joined()

    def _launch(self, build: Callable[[], Engine]) -> None:
        with self._launch_lock:
            if self.progress.busy:
                raise PoolBusy(f"a launch is already under way ({self.progress.phase})")
            self.progress = Progress("resolving the model", PHASES["resolving the model"])
            self._launch_thread = threading.Thread(target=self._launch_body, args=(build,), name="llmd-launch",
                                                   daemon=True)
            self._launch_thread.start()

    def expect_agents(self, count: int, timeout_s: float) -> None:
        """`llmd host --expect N`: join the first N agents that answer, then launch on them."""

        def body() -> None:
            found = self.host.wait_for_peers(count, timeout_s)
            if len(found) < count:
                self.progress = Progress("failed", error=f"found {len(found)} agent(s) answering within "
                                                         f"{timeout_s:g} s, expected {count}")
                return
            for s in found[:count]:
                self.host.join(s.peer.key)
            self.launch_on_joined()

        threading.Thread(target=body, name="llmd-expect", daemon=True).start()

    def _report(self, phase: str) -> None:
        self.progress = replace(self.progress, phase=phase, fraction=PHASES[phase])

    def _launch_body(self, build: Callable[[], Engine]) -> None:
        try:
            self._stop_engine("the pool is relaunching")  # replies under way end with that message
            engine = build()
            self._report("loading shards")
            engine.cluster.__enter__()
            if self._closing.is_set():
                engine.cluster.close()
                return
            self._measured = engine.cluster.driver.stats()
            self.engine = engine
            self._record_plan(engine, self._measured)
            self.serving = Serving(engine.cluster.driver, engine.text, engine.model, self.store,
                                   Limits(engine.spec.slots, self.config.max_waiting), on_lost=self._lost,
                                   on_moved=lambda plan: self._record_plan(engine, self._measured, plan),
                                   sample_now=self.sample_now)
            self._report("ready")
        except Exception as e:  # any failure is the launch's outcome, shown on the page
            self.progress = replace(self.progress, phase="failed", error=describe_error(e))

    def _lost(self, e: BaseException) -> None:
        """The engine loop stopped (a worker vanished): the page says so until a relaunch."""
        self.progress = replace(self.progress, phase="failed", error=describe_error(e))

    def _build_local(self) -> Engine:
        recipe = self.config.recipe
        setup = recipe.prepare(recipe.local_workers, False)
        cluster = ReportingLocalCluster(setup.spec, setup.world_size, setup.balancer)
        cluster.report = self._report
        device = "cpu" if setup.spec.device == "cpu" else "cuda"
        devices = [RankDevice(r, self.config.node, device if device == "cpu" else f"cuda:{r}")
                   for r in range(setup.world_size)]
        return Engine(recipe.model, setup.text, setup.spec, cluster, devices)

    def _build_remote(self) -> Engine:
        recipe = self.config.recipe
        joined = [s for s in self.host.peers() if s.joined and s.health == "ok"]
        if not joined:
            raise NoAgents("no joined agent answers: join at least one in the Cluster tab")
        health = [(s, self.host.client(s.peer).get("/v1/health")) for s in joined]
        agents = [(self.host.client(s.peer), h["devices"]) for s, h in health]
        setup = recipe.prepare(1 + sum(len(d) for _, d in agents), True)
        recipe.check_fit(setup, [(s.peer.advert.name, d, f) for s, h in health
                                 for d, f in zip(h["devices"], h["device_free_mb"], strict=True)])
        cluster = ReportingRemoteCluster(setup.spec, recipe.model, agents, self.config.address, setup.balancer)
        cluster.report = self._report
        devices = [RankDevice(0, self.config.node, setup.spec.device)]
        devices += [RankDevice(len(devices) + i, s.peer.advert.name, d)
                    for s, h in health for i, d in enumerate(h["devices"])]
        devices = [replace(d, rank=r) for r, d in enumerate(devices)]
        return Engine(recipe.model, setup.text, setup.spec, cluster, devices)

    def _record_plan(self, engine: Engine, measured: list[dict], plan: dict | None = None) -> None:
        """The plan (the balancer's latest when given) with what the planner predicts for it."""
        cfg = ModelConfig.from_hf(load_hf_config(Path(engine.spec.model_dir)))
        names = {f"cuda:{i}": n for i, (n, _) in self._gpu_names.items()}
        planner = [planner_device(d.node, d.device, names.get(d.device, "")) for d in engine.devices]
        precision = engine.spec.weights
        predicted = predict(cfg, planner, engine.spec.context, precision) if all(planner) else None
        plan = {**(plan or engine.spec.plan), "model": Path(engine.spec.model_dir).name, "num_layers": cfg.num_layers,
                "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                "intermediate_size": cfg.intermediate_size, "devices": [asdict(d) for d in engine.devices],
                "measured": measured}
        self.store.add_plan(plan, predicted)
        self.versions.plan += 1

    def _stop_engine(self, why: str) -> None:
        serving, self.serving = self.serving, None
        if serving is not None:
            serving.close(why)
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.cluster.close()

    # ---- chat and completions

    def _serving(self) -> tuple[Engine, Serving]:
        engine, serving = self.engine, self.serving
        if engine is None or serving is None or not self.progress.ready:
            p = self.progress
            why = f"failed: {p.error}" if p.phase == "failed" else f"{p.phase} ({p.fraction:.0%})"
            raise PoolNotReady(f"the model is not ready yet: {why}")
        return engine, serving

    def model_name(self) -> str | None:
        """The running model's name (what the API lists), None while none runs."""
        engine = self.engine
        return None if engine is None else Path(engine.spec.model_dir).name.split(".")[0]

    def text_model(self) -> TextModel:
        return self._serving()[0].text

    @property
    def context(self) -> int:
        return self._serving()[0].spec.context

    def waiting(self) -> int:
        serving = self.serving
        return serving.waiting() if serving else 0

    def running(self) -> int:
        serving = self.serving
        return serving.running() if serving else 0

    def submit(self, request: Request) -> Ticket:
        """Queue a request (the API's way in); raises PoolNotReady, PromptTooLong or QueueFull."""
        return self._serving()[1].submit(request)

    def chat(self, messages: list[dict], settings: ChatSettings,
             should_stop: Callable[[], bool] = lambda: False) -> Iterator[Trimmed | Event]:
        """A chat reply's events (`Token`s, then `Finished` or `Failed`), after a `Trimmed` when the oldest
        turns had to be left out to fit the context. Journalled before it runs."""
        engine, serving = self._serving()
        ids, dropped = fit_history(engine.text, messages, engine.spec.context, settings.max_new_tokens)
        if dropped:
            yield Trimmed(dropped, len(ids))
        request = Request(ids, settings.sampling(engine.text.stop_token_ids), user=self.config.user,
                          prompt_text=last_user_text(messages))
        ticket = serving.submit(request)
        self.versions.requests += 1
        try:
            yield from ticket.events(lambda: should_stop() or self._closing.is_set())
        finally:
            self.versions.requests += 1

    def login(self, user: str, password: str) -> bool:
        """The web page's login beyond loopback: a live API key, under its own name."""
        return key_name(self.store, password or "") == user

    # ---- peers

    def peers(self) -> list[dict]:
        """The peer table, with `local` marking this machine's own agent."""
        if self.host is None:
            return []
        return [{**s.to_dict(), "local": self._is_local(s.peer.advert)} for s in self.host.peers()]

    def _is_local(self, advert) -> bool:
        return advert.name == self.config.node and advert.address == self.config.address

    def join(self, name: str) -> dict:
        status = self.host.join(name)
        self._record_peers()
        return status.to_dict()

    def drop(self, name: str) -> dict:
        status = self.host.drop(name)
        self._record_peers()
        return status.to_dict()

    def _record_peers(self) -> None:
        for s in self.host.peers():
            a = s.peer.advert
            if self.agent is not None and not self._local_agent_joined and self._is_local(a) and s.health == "ok":
                s.joined = self._local_agent_joined = True  # its devices already run the local engine
            self.store.upsert_node(a.agent_id, a.name, a.address, a.port, s.joined,
                                   [{"summary": a.devices, "count": a.device_count, "free_mb": a.free_mb,
                                     "health": s.health}])

    # ---- samples

    def sample_now(self) -> None:
        with self._sample_lock:  # psutil measures CPU time between two reads of the same process
            self.store.add_samples(self.local_samples(time.time()))
            self.versions.samples += 1

    def _sample_loop(self) -> None:
        tick = 0
        while not self._closing.wait(self.config.sample_period_s):
            try:
                self.sample_now()
                self.store.add_samples(self.peer_samples(time.time()))
                self._check_agent()
                if tick % PEERS_EVERY == 0:
                    self._record_peers()
                if tick % DOWNSAMPLE_EVERY == DOWNSAMPLE_EVERY - 1:
                    self.store.downsample()
            except (StoreError, OSError, psutil.Error) as e:  # shown on the page; the next tick tries again
                self.problem = f"sampler: {describe_error(e)}"
            tick += 1

    def _check_agent(self) -> None:
        code = None if self.agent is None else self.agent.poll()
        self.problem = "" if code is None else (f"this machine's agent exited with code {code}: other hosts no "
                                                "longer see it (the local engine keeps running)")

    def describe(self) -> str:
        """What is running, for the status line: e.g. "SmolLM2-135M-Instruct, int8 weights, on 2 rank(s) (vm cpu x2)"."""
        engine = self.engine
        if engine is None:
            return ""
        where: dict[str, int] = {}
        for d in engine.devices:
            where[f"{d.node} {d.device}"] = where.get(f"{d.node} {d.device}", 0) + 1
        spread = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in where.items())
        name = Path(engine.spec.model_dir).name.split(".")[0]
        return f"{name}, {engine.spec.weights} weights, on {len(engine.devices)} rank(s) ({spread})"

    def local_samples(self, now: float) -> list[Sample]:
        if self._gpu_names:
            return self._gpu_samples(now)
        return self._cpu_samples(now)

    def _gpu_samples(self, now: float) -> list[Sample]:
        out = []
        for g in inventory.read_gpu_samples():
            _, total = self._gpu_names.get(g["index"], ("", 0.0))
            out.append(Sample(now, self.config.node, f"cuda:{g['index']}", float(g["utilization_pct"] or 0),
                              float(g["memory_used_mb"] or 0), total, g["power_w"], g["temperature_c"]))
        return out

    def rank_processes(self) -> dict[int, psutil.Process]:
        """Rank -> process of each CPU rank on this machine: this process is rank 0."""
        pids = {0: os.getpid()}
        engine = self.engine
        if engine is not None and isinstance(engine.cluster, LocalCluster):
            pids.update({rank: p.pid for rank, p in enumerate(engine.cluster.procs, start=1)})
        self._procs = {pid: self._procs.get(pid) or psutil.Process(pid) for pid in pids.values()}
        return {rank: self._procs[pid] for rank, pid in pids.items()}

    def _cpu_samples(self, now: float) -> list[Sample]:
        engine = self.engine
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
            out.append(Sample(now, self.config.node, f"cpu:{rank}", util, reading.rss_mb, ram,
                              costs.cpu_power_w(util, tdp), temperature, power_estimated=True))
        return out

    def peer_samples(self, now: float) -> list[Sample]:
        """Joined agents on other machines report their GPUs (or CPU) through their signed metrics call."""
        if self.host is None:
            return []
        out = []
        for s in self.host.peers():
            if not s.joined or s.health != "ok" or self._is_local(s.peer.advert):
                continue
            try:
                m = self.host.client(s.peer, timeout_s=1.0).get("/v1/metrics")
            except (AgentUnreachable, AgentRefused):
                continue  # the heartbeat marks it lost
            out += metric_samples(now, s.peer.advert.name, m, self.store.settings().cpu_tdp_w)
        return out

    def recent_samples(self, window_s: float = 300.0) -> list[dict]:
        return self.store.samples(since=time.time() - window_s)

    def save_settings(self, settings) -> None:
        self.store.save_settings(settings)
        self.versions.settings += 1

    # ---- shutting down

    def close(self) -> None:
        self._closing.set()
        if self._launch_thread is not None:
            self._launch_thread.join(timeout=30)
        self._stop_engine("the pool is shutting down")
        if self._sampler.is_alive():
            self._sampler.join(timeout=10)
        self.progress = replace(self.progress, phase="stopped")
        self._stop_agent()
        if self.host is not None:
            self.host.close()

    def _stop_agent(self) -> None:
        if self.agent is None or self.agent.poll() is not None:
            return
        self.agent.terminate()  # it unregisters its mDNS record on SIGTERM
        try:
            self.agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()


def metric_samples(now: float, node: str, metrics: dict, tdp_w: float) -> list[Sample]:
    """An agent's `/v1/metrics` answer as samples: one per GPU, else one for its CPU (estimated power)."""
    gpus = metrics.get("gpus") or []
    if gpus:
        return [Sample(now, node, f"cuda:{g['index']}", float(g["utilization_pct"] or 0),
                       float(g["memory_used_mb"] or 0), float(g.get("memory_total_mb") or 0), g["power_w"],
                       g["temperature_c"]) for g in gpus]
    util = float(metrics.get("cpu_pct") or 0.0)
    return [Sample(now, node, "cpu", util, 0.0, 0.0, costs.cpu_power_w(util, tdp_w), None, power_estimated=True)]


def fit_history(text: TextModel, messages: list[dict], context: int, max_new_tokens: int) -> tuple[list[int], int]:
    """The chat's prompt ids, leaving out its oldest turns (the system message kept) until the prompt
    leaves room for the reply: `max_new_tokens`, but at most half the context. Returns (ids, messages
    left out). The last message always stays; one alone too long is refused when it is submitted."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    reserve = min(max(int(max_new_tokens), 1), context // 2)
    dropped = 0
    while True:
        ids = text.chat_ids(system + rest)
        if len(ids) + reserve <= context or len(rest) <= 1:
            return ids, dropped
        cut = 1
        while cut < len(rest) - 1 and rest[cut].get("role") != "user":  # a turn starts with the user
            cut += 1
        rest, dropped = rest[cut:], dropped + cut
