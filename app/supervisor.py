"""The pool's machinery: this machine's agent child, discovery of the others, and the engine launched
in the background with its progress, replaced on relaunch and reported failed when a worker is lost.

Once an engine is up it hands it to a `Serving` loop (app/serving.py); the supervisor only starts, stops
and replaces them.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llmd.engine.checkpoint import model_name
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.errors import LlmdError
from llmd.engine.partition import Device, plan_partition
from llmd.engine.presets import DEVICE_KINDS
from llmd.engine.quant import PRECISIONS, group_size
from llmd.engine.worker import RankSpec

from .host import Fetch, Host, NoAgents, PeerStatus, RemoteCluster
from .inventory import summary_devices
from .models import Found, ModelServer, find_models
from .options import EngineOptions
from .client import http_base
from .launch import Cluster, LocalCluster
from .serving import Limits, Serving, describe_error
from .store import Store
from .text import TextModel


class PoolBusy(LlmdError): ...


# How far along a launch is when it enters each phase (the UI draws a bar from it).
PHASES = {"waiting": 0.0, "resolving the model": 0.05, "starting workers": 0.15, "loading shards": 0.3,
          "warming up": 0.8, "ready": 1.0}
PEERS_EVERY = 5  # sampler ticks between two records of the peer table
LISTING_S = 10.0  # how long a listing of the models folder (and its plans) is shown before it is made again


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

    model: str  # as the user gave it: "default", a directory, a Hugging Face id or a .gguf file
    prepare: Callable[[int | None, bool, str], Setup]  # (world size, ranks 1.. on agents, model) -> its spec
    check_fit: Callable[[Setup, list[tuple[str, str, int]]], None]  # raises ModelDoesNotFit
    local: bool = False  # `llmd up`: every rank on this machine; `llmd host`: on the joined agents
    local_workers: int | None = None  # None: as many as the plan file has
    models_dir: str | None = None  # a folder of models the page offers to switch to


@dataclass
class PoolConfig:
    node: str  # this machine's name in the pool
    address: str  # its LAN address: mDNS, the agents' control calls, the engine's rendezvous
    secret: str
    recipe: Recipe
    user: str = "web"
    sample_period_s: float = 1.0
    max_waiting: int = 32  # requests queued beyond the free KV slots before new ones are told "busy"


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


class Supervisor:
    """Starts the agent child and discovery, launches engines and runs them under `Serving`."""

    def __init__(self, store: Store, config: PoolConfig, sample_now: Callable[[], None] = lambda: None,
                 gpu_names: Callable[[], dict[str, str]] = dict):
        self.store, self.config = store, config
        self.sample_now, self.gpu_names = sample_now, gpu_names
        self.host: Host | None = None
        self.agent: subprocess.Popen | None = None
        self.engine: Engine | None = None
        self.serving: Serving | None = None  # the engine loop, once an engine is up
        self.progress = Progress()
        self.problem = ""  # this machine's agent exited
        self.plan_version = 0  # bumped on every plan recorded
        self._closing = threading.Event()
        self._launch_thread: threading.Thread | None = None
        self._launch_lock = threading.Lock()
        self._local_agent_joined = False
        self._measured: list[dict] = []  # each rank's weights and peak memory, read once the engine is up
        self.fetches: dict[str, Fetch] = {}  # agent control address -> what its workers fetched this launch
        self._models: ModelServer | None = None  # serves slices fetched ahead of a launch (`join`)
        self._listing: tuple | None = None  # the models folder's last listing: (what it depends on, when, rows)

    def start(self, local_agent_devices: str | None = None, local_agent: bool = True) -> None:
        """The agent child first (before any thread of ours exists), then discovery."""
        if local_agent:
            self.start_local_agent(local_agent_devices)
        self.host = Host(self.config.secret, self.config.address)

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

    # ---- launching the engine in the background

    def launch_local(self) -> None:
        """`llmd up`: every rank on this machine."""
        self._launch(self._build_local)

    def launch_on_joined(self) -> None:
        """`llmd host`: rank 0 here, ranks 1.. on the joined agents' devices."""
        self._launch(self._build_remote)

    def models(self) -> list[tuple[Found, list[str]]]:
        """The models folder's models, each with the precisions the planner says fit the devices of the next
        launch (none known for a GPU the planner does not know, or for a GGUF file before it is converted)."""
        folder = self.config.recipe.models_dir
        if not folder:
            return []
        joined = tuple(s.peer.key for s in self.host.peers() if s.joined) if self.host else ()
        key = (folder, id(self.engine), joined)
        listed = self._listing
        if listed is None or listed[0] != key or time.monotonic() - listed[1] > LISTING_S:
            listed = self._listing = (key, time.monotonic(), [(m, self.fitting(m)) for m in find_models(Path(folder))])
        return listed[2]

    def next_devices(self) -> list[Device | None]:
        """The devices the next launch runs on, as the planner sees them: rank 0 here and every device of the
        joined agents (from their mDNS records, no call to any), else this engine's own."""
        joined = [s for s in self.host.peers() if s.joined and s.health == "ok"] if self.host else []
        engine = self.engine
        if not joined:
            names = self.gpu_names()
            return [planner_device(d.node, d.device, names.get(d.device, "")) for d in engine.devices] if engine else []
        first = engine.spec.device if engine else "cpu"
        out = [planner_device(self.config.node, first, self.gpu_names().get("cuda:0", ""))]
        for s in joined:
            kinds = summary_devices(s.peer.advert.devices)
            out += [planner_device(s.peer.advert.name, kind, name) for kind, name in kinds] or [None]
        return out

    def fitting(self, model: Found) -> list[str]:
        devices = self.next_devices()
        if model.config is None or not devices or not all(devices):
            return []
        try:
            cfg = ModelConfig.from_hf(load_hf_config(model.config.parent))
        except (LlmdError, OSError, ValueError, KeyError):
            return []
        context = self.engine.spec.context if self.engine else 2048
        out = []
        for precision in PRECISIONS:
            try:
                if precision == "int4":
                    group_size(cfg)  # its sizes in whole groups, or UnsupportedModel
                if plan_partition(cfg, devices, precision=precision, context=context).fits:
                    out.append(precision)
            except LlmdError:
                pass
        return out

    def set_models_dir(self, folder: str) -> str:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise LlmdError(f"{folder} is not a folder on this machine")
        self.config.recipe = replace(self.config.recipe, models_dir=str(path))
        return str(path)

    def switch_model(self, name: str) -> None:
        """Relaunch on a model of the models folder, by its name there (the page never sees a path)."""
        paths = {m.name: m.path for m, _ in self.models()}
        if name not in paths:
            raise LlmdError(f"{name!r} is not in the models folder")
        self.config.recipe = replace(self.config.recipe, model=paths[name])
        self.relaunch()

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
        setup = recipe.prepare(recipe.local_workers, False, recipe.model)
        cluster = ReportingLocalCluster(setup.spec, setup.world_size, setup.balancer)
        cluster.report = self._report
        device = "cpu" if setup.spec.device == "cpu" else "cuda"
        devices = [RankDevice(r, self.config.node, device if device == "cpu" else f"cuda:{r}")
                   for r in range(setup.world_size)]
        return Engine(recipe.model, setup.text, setup.spec, cluster, devices)

    def _joined(self) -> list[tuple[PeerStatus, dict]]:
        """The joined agents that answer, with their health (devices, free memory), in rank order."""
        joined = [s for s in self.host.peers() if s.joined and s.health == "ok"]
        if not joined:
            raise NoAgents("no joined agent answers: join at least one in the Cluster tab")
        return [(s, self.host.client(s.peer).get("/v1/health")) for s in joined]

    def _build_remote(self) -> Engine:
        recipe = self.config.recipe
        health = self._joined()
        agents = [(self.host.client(s.peer), h["devices"]) for s, h in health]
        setup = recipe.prepare(1 + sum(len(d) for _, d in agents), True, recipe.model)
        recipe.check_fit(setup, [(s.peer.advert.name, d, f) for s, h in health
                                 for d, f in zip(h["devices"], h["device_free_mb"], strict=True)])
        cluster = ReportingRemoteCluster(setup.spec, recipe.model, agents, self.config.address, setup.balancer)
        cluster.report = self._report
        self.fetches = {}
        cluster.on_fetch = lambda fetches: setattr(self, "fetches", {f.agent: f for f in fetches})
        devices = [RankDevice(0, self.config.node, setup.spec.device)]
        devices += [RankDevice(len(devices) + i, s.peer.advert.name, d)
                    for s, h in health for i, d in enumerate(h["devices"])]
        devices = [replace(d, rank=r) for r, d in enumerate(devices)]
        return Engine(recipe.model, setup.text, setup.spec, cluster, devices)

    def _record_plan(self, engine: Engine, measured: list[dict], plan: dict | None = None) -> None:
        """The plan (the balancer's latest when given) with what the planner predicts for it."""
        cfg = ModelConfig.from_hf(load_hf_config(Path(engine.spec.model_dir)))
        names = self.gpu_names()
        planner = [planner_device(d.node, d.device, names.get(d.device, "")) for d in engine.devices]
        precision = engine.spec.weights
        predicted = predict(cfg, planner, engine.spec.context, precision) if all(planner) else None
        plan = {**(plan or engine.spec.plan), "model": Path(engine.spec.model_dir).name, "num_layers": cfg.num_layers,
                "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                "intermediate_size": cfg.intermediate_size, "devices": [asdict(d) for d in engine.devices],
                "measured": measured}
        self.store.add_plan(plan, predicted)
        self.plan_version += 1

    def _stop_engine(self, why: str) -> None:
        serving, self.serving = self.serving, None
        if serving is not None:
            serving.close(why)
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.cluster.close()

    # ---- peers

    def peers(self) -> list[dict]:
        """The peer table, with `local` marking this machine's own agent."""
        if self.host is None:
            return []
        fetched = self.fetches
        return [{**s.to_dict(), "local": self._is_local(s.peer.advert),
                 "fetch": fetched.get(http_base(s.peer.advert.address, s.peer.advert.port))}
                for s in self.host.peers()]

    def _is_local(self, advert) -> bool:
        return advert.name == self.config.node and advert.address == self.config.address

    def join(self, name: str) -> dict:
        """Join an agent to the next launch; while an engine serves, the joined agents that lack the model
        start fetching the slices that launch will give them."""
        status = self.host.join(name)
        self._record_peers()
        if self.engine is not None and not self.progress.busy:
            threading.Thread(target=self._prefetch, name="llmd-prefetch", daemon=True).start()
        return status.to_dict()

    def _prefetch(self) -> None:
        """Plan the next launch over the joined agents and ask each for its ranks' slices ahead of it; follow
        their progress (the Cluster tab shows it) until they are done. Best effort: the launch itself
        fetches whatever is still missing."""
        try:
            health = self._joined()
            recipe = self.config.recipe
            setup = recipe.prepare(1 + sum(len(h["devices"]) for _, h in health), True, recipe.model)
            with self._launch_lock:
                if self._models is None:
                    self._models = ModelServer(self.config.address, self.config.secret)
            source = asdict(self._models.offer(Path(setup.spec.model_dir)))
            options, rank, asked = EngineOptions.of(setup.spec), 1, []
            for s, h in health:
                ranks = [{"rank": rank + i, "device": d} for i, d in enumerate(h["devices"])]
                rank += len(ranks)
                client = self.host.client(s.peer, timeout_s=600)  # an agent with the files hashes them first
                client.post("/v1/prefetch", {"model": recipe.model, "plan": setup.spec.plan, "ranks": ranks,
                                             "dtype": options.dtype, "weights": options.weights,
                                             "context": options.context, "source": source})
                asked.append(client)
            self._follow_prefetch(asked, source["model_id"])
        except (LlmdError, OSError) as e:
            print(f"llmd: fetching slices ahead of the next launch: {e}", file=sys.stderr, flush=True)

    def _follow_prefetch(self, clients: list, model_id: str) -> None:
        """Show each agent's prefetch of `model_id` until none is still running."""
        running = True
        while running and not self._closing.wait(0.5):
            jobs = [(c, p) for c in clients for p in c.get("/v1/prefetch")["prefetches"] if p["model_id"] == model_id]
            shown = {c.base: Fetch(c.base, **p["fetch"]) for c, p in jobs if p["fetch"]}
            self.fetches = {**self.fetches, **shown}
            running = any(p["running"] for _, p in jobs)

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

    def each_tick(self, tick: int) -> None:
        """The sampler's periodic checks: this machine's agent, and the peer table every few ticks."""
        self._check_agent()
        if tick % PEERS_EVERY == 0:
            self._record_peers()

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
        name = model_name(Path(engine.spec.model_dir))
        return f"{name}, {engine.spec.weights} weights, on {len(engine.devices)} rank(s) ({spread})"

    def close(self) -> None:
        self._closing.set()
        if self._launch_thread is not None:
            self._launch_thread.join(timeout=30)
        self._stop_engine("the pool is shutting down")
        self.progress = replace(self.progress, phase="stopped")
        self._stop_agent()
        if self._models is not None:
            self._models.close()
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
