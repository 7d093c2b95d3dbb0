"""`llmd agent`: one per workstation. Advertises its devices over mDNS and, when the
host asks with a signed request, starts engine workers and watches them."""

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import tempfile
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import psutil
import uvicorn
from fastapi import FastAPI
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

import llmd
from llmd.engine import quant
from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.errors import LlmdError
from llmd.engine.partition import load_plan
from llmd.engine.plan import Plan

from . import inventory
from .discovery import Advert, Advertiser, open_zeroconf
from .guard import PlainJSON, SignedApi, bound_socket, error, plain_errors, server_config
from .model_cache import (CACHE_MAX_ENV, PROGRESS_ENV, SOURCE_ENV, HostClient, dense_kind, fetch_for, open_fetched,
                          prepare, read_progress, source_to_env)
from .models import Manifest, ModelUnavailable, Source, make_manifest, same_sizes
from .net import engine_env, worker_failure
from .options import EngineOptions
from .rendezvous import rendezvous_url, worker_command
from .security import Verifier, receiver_name


class LaunchRefused(LlmdError): ...


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RankAssignment(Strict):
    rank: int = Field(ge=1, le=4096)
    device: str = Field(pattern=r"^(cpu|cuda:\d{1,3})$")


def an_ip_address(value: str) -> str:
    ipaddress.ip_address(value)  # a ValueError is a 400 naming the field
    return value


IpAddress = Annotated[str, Field(min_length=2, max_length=45), AfterValidator(an_ip_address)]


class ModelSource(Strict):
    """Where the host serves the launch's model (app/models.py), and the model's id by content."""

    address: IpAddress
    port: int = Field(ge=1, le=65535)
    server_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    model_id: str = Field(pattern=r"^[0-9a-f]{32}$")


class LaunchRequest(Strict):
    launch_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    master_addr: IpAddress
    master_port: int = Field(ge=1, le=65535)
    model: str = Field(min_length=1, max_length=4096)
    plan: dict
    ranks: list[RankAssignment] = Field(min_length=1, max_length=64)
    # The launch's engine options, whole (app/options.py `EngineOptions.wire`).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    weights: Literal["fp32", "bf16", "fp16", "int8", "int4"] = "fp32"
    context: int = Field(ge=2, le=1 << 20)
    slots: int = Field(default=1, ge=1, le=1024)
    timeout_s: float = Field(gt=0, le=3600)
    compile: bool = False
    reshardable: bool = False
    slowdown: list[tuple[int, float, int]] = Field(default_factory=list, max_length=4096)
    source: ModelSource | None = None  # None: the model must be on this agent's disk


class PrefetchRequest(Strict):
    """A launch to come, for this agent to fetch its ranks' slices ahead of it while the pool serves."""

    model: str = Field(min_length=1, max_length=4096)
    plan: dict
    ranks: list[RankAssignment] = Field(min_length=1, max_length=64)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    weights: Literal["fp32", "bf16", "fp16", "int8", "int4"] = "fp32"
    context: int = Field(default=2, ge=2, le=1 << 20)
    slowdown: list[tuple[int, float, int]] = Field(default_factory=list, max_length=0)
    source: ModelSource


class StopRequest(Strict):
    launch_id: str = Field(min_length=1, max_length=64)


def launch_options(req: LaunchRequest) -> EngineOptions:
    wire = req.model_dump(exclude={"launch_id", "master_addr", "master_port", "model", "ranks", "source"})
    slowdown = tuple(tuple(s) for s in wire.pop("slowdown"))
    return EngineOptions(**wire, slowdown=slowdown)


def agent_model(name: str) -> Path:
    """The model a launch names, if this agent has it ready: the bundled default, or a Hugging Face
    directory. Any other GGUF file would be hashed and converted inside the request: refused."""
    if name != "default" and Path(name).suffix == ".gguf":
        raise LaunchRefused("an agent runs a GGUF file only as `default`, the bundled model; "
                            "give it a Hugging Face directory")
    try:
        return resolve_model(name)
    except LlmdError as e:
        raise LaunchRefused(str(e)) from None


def local_copy(name: str, model_id: str, manifest: Manifest | None = None) -> Path | None:
    """The model on this agent's own disk, where the launch names it, if its content is the host's. With the
    host's `manifest`, a folder whose files differ in name or size is passed over without hashing it."""
    if name != "default" and Path(name).suffix == ".gguf":
        return None
    try:
        here = resolve_model(name)
        if manifest is not None and not same_sizes(here, manifest):
            return None
        return here if make_manifest(here).id == model_id else None
    except (LlmdError, OSError, ValueError, KeyError):
        return None


@dataclass
class WorkerProcess:
    launch_id: str
    rank: int
    device: str
    proc: subprocess.Popen
    log: Path
    fetch: Path | None = None  # its progress fetching slices from the host, when it does

    def status(self) -> dict:
        code = self.proc.poll()
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return {"launch_id": self.launch_id, "rank": self.rank, "device": self.device, "pid": self.proc.pid,
                "running": code is None, "exit_code": code, "last_line": worker_failure(text),
                "fetch": read_progress(self.fetch) if self.fetch else None}


@dataclass
class Prefetch:
    """Slices fetched ahead of a launch, in a thread of the agent."""

    model_id: str
    progress: Path
    thread: threading.Thread | None = None
    error: str = ""

    def status(self) -> dict:
        return {"model_id": self.model_id, "running": bool(self.thread and self.thread.is_alive()),
                "error": self.error, "fetch": read_progress(self.progress)}


@dataclass
class AgentState:
    agent_id: str
    name: str
    address: str
    devices: list[str]  # what this agent offers, e.g. ["cpu", "cpu"] or ["cuda:0", "cuda:1"]
    verifier: Verifier
    threads: int | None = None  # torch threads per CPU worker; None: cores / CPU workers
    memory_cap_mb: int | None = None  # the most RAM the CPU workers may use, all together
    cache_max_bytes: int | None = None  # the most the cache of fetched models may hold
    workers: list[WorkerProcess] = field(default_factory=list)
    prefetches: dict[str, Prefetch] = field(default_factory=dict)  # by model id
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llmd-agent-")))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def device_free_mb(self) -> list[int]:
        """Free memory of each offered device: its GPU's, or a CPU worker's part of the RAM."""
        gpu_free = {}
        if any(d != "cpu" for d in self.devices):  # one NVML read for all GPUs, and none without them
            gpu_free = {f"cuda:{g.index}": g.memory_free_mb for g in inventory.read_inventory().gpus}
        ram = psutil.virtual_memory().available // 2**20
        if self.memory_cap_mb:
            ram = min(ram, self.memory_cap_mb)
        cpu_share = ram // max(self.devices.count("cpu"), 1)
        return [cpu_share if d == "cpu" else gpu_free.get(d, 0) for d in self.devices]

    def launch(self, req: LaunchRequest) -> list[dict]:
        """Start the request's ranks, once the whole request is known to be good: a refused launch
        leaves nothing running."""
        model_dir, fetch_from = self.check(req)
        options = launch_options(req)
        cpu_workers = sum(1 for r in req.ranks if r.device == "cpu")
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(cpu_workers, 1))
        # The workers prove themselves to the rendezvous with the pool secret, which never crosses the wire.
        env = dict(os.environ, PYTHONUNBUFFERED="1", LLMD_RENDEZVOUS_KEY=self.verifier.secret,
                   **engine_env(self.address))
        if fetch_from is not None:  # the workers fetch their slices into this agent's cache
            env.update({SOURCE_ENV: source_to_env(fetch_from), CACHE_MAX_ENV: str(self.cache_max_bytes or 0)})
        started: list[WorkerProcess] = []
        with self.lock:
            if any(w.launch_id == req.launch_id for w in self.workers):
                raise LaunchRefused(f"launch {req.launch_id} was started here already")
            try:
                for r in req.ranks:
                    spec = options.rank_spec(str(model_dir), r.rank, threads, device=r.device)
                    log = self.logdir / f"{req.launch_id}-rank{r.rank}.log"
                    fetch = self.logdir / f"{req.launch_id}-rank{r.rank}.fetch.json" if fetch_from else None
                    cmd = worker_command(spec, rendezvous_url(req.master_addr, req.master_port), req.launch_id)
                    with open(log, "w") as f:
                        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env={**env, PROGRESS_ENV: str(fetch)} if fetch else env)
                    started.append(WorkerProcess(req.launch_id, r.rank, r.device, proc, log, fetch))
            except BaseException:
                for w in started:
                    w.proc.kill()
                    w.proc.wait()
                raise
            self.workers += started
        return [w.status() for w in started]

    def prefetch(self, req: PrefetchRequest) -> dict:
        """Start fetching the slices the request's ranks will read (none when this agent has the files)."""
        model_dir, fetch_from = self.check(req)
        with self.lock:
            known = self.prefetches.get(req.source.model_id)
            if known is not None and known.thread is not None and known.thread.is_alive():
                return known.status()
            job = Prefetch(req.source.model_id, self.logdir / f"prefetch-{req.source.model_id}.json")
            self.prefetches[job.model_id] = job
            if fetch_from is None:  # it has the files: nothing to fetch
                job.progress.write_text(json.dumps({"bytes": 0, "total": 0, "rate": 0, "left_s": None}))
                return job.status()

            def run() -> None:
                try:
                    reader = open_fetched(model_dir, fetch_from, self.verifier.secret, self.cache_max_bytes,
                                          dense_kind(req.dtype))
                    fetch_for(reader, [r.rank for r in req.ranks], Plan.from_dict(req.plan), req.weights,
                              f"llmd agent {self.name}", str(job.progress))
                except Exception as e:  # reported in its status; the launch fetches what is still missing
                    job.error = f"{type(e).__name__}: {e}"

            job.thread = threading.Thread(target=run, name="llmd-prefetch", daemon=True)
            job.thread.start()
            return job.status()

    def check(self, req: "LaunchRequest | PrefetchRequest") -> tuple[Path, Source | None]:
        """Why the request cannot run (LaunchRefused), else the model directory it names and, when this
        agent lacks the model's weights, where its workers fetch their slices."""
        ranks = [r.rank for r in req.ranks]
        if len(set(ranks)) != len(ranks):
            raise LaunchRefused(f"ranks {ranks} name a rank twice")
        asked, offered = Counter(r.device for r in req.ranks), Counter(self.devices)
        over = [f"{n} x {d}" for d, n in asked.items() if n > offered[d]]
        if over:
            raise LaunchRefused(f"this agent offers {self.devices}, not {', '.join(over)}")
        model_dir, fetch_from = self.locate(req)
        try:
            cfg = ModelConfig.from_hf(load_hf_config(model_dir))
            plan = load_plan(json.dumps(req.plan), cfg, source="the launch's plan",
                             column_unit=quant.column_unit(cfg, req.weights))
        except (LlmdError, ValueError, TypeError, KeyError, RecursionError) as e:
            raise LaunchRefused(str(e)) from None
        if not all(0 < r < plan.world_size for r in ranks):
            raise LaunchRefused(f"ranks {ranks} are not all within 1..{plan.world_size - 1}")
        if req.context > cfg.max_positions:
            raise LaunchRefused(f"context {req.context} is over the model's {cfg.max_positions} positions")
        for rank, factor, step in req.slowdown:
            if not (0 <= rank < plan.world_size and 1 <= factor <= 100 and step >= 0):
                raise LaunchRefused(f"slowdown {[rank, factor, step]} needs a rank of the plan, a factor "
                                    "from 1 to 100 and a step >= 0")
        return model_dir, fetch_from

    def locate(self, req: LaunchRequest) -> tuple[Path, Source | None]:
        """Local files win: the model on this disk when its content is the host's, else its small files
        fetched into the cache (once per model), the workers fetching their slices after."""
        if req.source is None:
            return agent_model(req.model), None
        source = Source(**req.source.model_dump())
        client = HostClient(source, self.verifier.secret)
        try:
            manifest = client.manifest()  # small: names which local folder could be the model before hashing one
        except ModelUnavailable:
            manifest = None
        here = local_copy(req.model, source.model_id, manifest)
        if here is not None:
            return here, None
        try:
            return prepare(source, client, manifest=manifest), source
        except (ModelUnavailable, OSError, ValueError) as e:
            raise LaunchRefused(f"this agent lacks the model and could not fetch it: {e}") from None

    def stop(self, launch_id: str | None = None) -> int:
        with self.lock:
            chosen = [w for w in self.workers if launch_id is None or w.launch_id == launch_id]
        for w in chosen:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in chosen:
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        return len(chosen)


def create_app(state: AgentState):
    """The control API, behind `SignedApi`: nothing below runs for a request without the pool's signature."""
    app = FastAPI(title="llmd agent", version=llmd.__version__, default_response_class=PlainJSON,
                  openapi_url=None, docs_url=None, redoc_url=None)
    plain_errors(app)

    @app.get("/v1/health")
    def health():
        return {"ok": True, "agent_id": state.agent_id, "name": state.name, "version": llmd.__version__,
                "devices": state.devices, "device_free_mb": state.device_free_mb(),
                "workers": [w.status() for w in state.workers]}

    @app.get("/v1/inventory")
    def get_inventory():
        return {"inventory": inventory.read_inventory().to_dict(), "devices": state.devices}

    @app.get("/v1/metrics")
    def metrics():
        vm = psutil.virtual_memory()
        return {"gpus": inventory.read_gpu_samples(), "cpu_pct": psutil.cpu_percent(interval=None),
                "ram_free_mb": vm.available // 2**20}

    @app.post("/v1/launch")
    def launch(req: LaunchRequest):
        try:
            return {"started": state.launch(req)}
        except LaunchRefused as e:  # a model it lacks, a rank out of range: the host shows this line
            return error(400, f"launch refused: {e}")

    @app.post("/v1/prefetch")
    def prefetch(req: PrefetchRequest):
        try:
            return {"prefetch": state.prefetch(req)}
        except LaunchRefused as e:
            return error(400, f"prefetch refused: {e}")

    @app.get("/v1/prefetch")
    def prefetches():
        with state.lock:
            jobs = list(state.prefetches.values())
        return {"prefetches": [p.status() for p in jobs]}

    @app.post("/v1/stop")
    def stop(req: StopRequest):
        return {"stopped": state.stop(req.launch_id)}

    @app.get("/v1/workers")
    def workers():
        return {"workers": [w.status() for w in state.workers]}

    return SignedApi(app, state.verifier)


def offered_devices(spec: str | None, inv) -> list[str]:
    """`cpu:N` -> N CPU workers; default: every NVIDIA GPU, else one CPU worker."""
    if spec:
        kind, _, count = spec.partition(":")
        if kind != "cpu" or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--devices takes cpu:N (N >= 1), got {spec!r}")
        return ["cpu"] * int(count)
    if inv.gpus:
        return [f"cuda:{g.index}" for g in inv.gpus]
    return ["cpu"]


def advertise_free_memory(state: AgentState, advertiser: Advertiser, stop: threading.Event) -> None:
    """Re-announce the TXT record when free memory moves by more than a tenth."""
    while not stop.wait(5.0):
        free = sum(state.device_free_mb())
        if abs(free - advertiser.advert.free_mb) > advertiser.advert.free_mb / 10:
            advertiser.update(free_mb=free)


class QuietServer(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after shutting down, which would kill the process before
    the agent unregisters its mDNS record and stops its workers; we handle those signals ourselves."""

    def capture_signals(self):
        return contextlib.nullcontext()


def run_agent(name: str, address: str, port: int, secret: str, devices_spec: str | None,
              threads: int | None = None, memory_cap_mb: int | None = None, cache_max_bytes: int | None = None) -> None:
    inv = inventory.read_inventory()
    devices = offered_devices(devices_spec, inv)
    sock = bound_socket(address, port)
    port = sock.getsockname()[1]
    # Every request names this agent and its address: one captured here is refused by any other agent.
    agent_id = uuid.uuid4().hex
    state = AgentState(agent_id=agent_id, name=name, address=address, devices=devices,
                       verifier=Verifier(secret, receiver_name(agent_id, address, port)), threads=threads,
                       memory_cap_mb=memory_cap_mb, cache_max_bytes=cache_max_bytes)
    cpu_n = devices.count("cpu")
    advert = Advert(agent_id=state.agent_id, name=name, version=llmd.__version__,
                    devices=inventory.device_summary(inv, cpu_n), device_count=len(devices),
                    free_mb=sum(state.device_free_mb()), address=address, port=port)
    if not inv.gpus:
        print(f"llmd agent: {inv.note}", flush=True)
    server = QuietServer(server_config(create_app(state)))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    zc = open_zeroconf(address)
    advertiser = Advertiser(zc, advert)
    advertiser.register()
    print(f"llmd agent {name} listening on {address}:{port}, offering {advert.devices} (agent id {agent_id})",
          flush=True)
    stop_updates = threading.Event()
    threading.Thread(target=advertise_free_memory, args=(state, advertiser, stop_updates), daemon=True).start()
    try:
        server.run(sockets=[sock])  # returns on SIGINT/SIGTERM
    finally:
        stop_updates.set()
        state.stop()
        advertiser.unregister()
        zc.close()
        print(f"llmd agent {name} stopped", flush=True)
