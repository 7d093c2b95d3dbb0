"""`llmd agent`: one per workstation. Advertises its devices over mDNS and, when the
host asks with a signed request, starts engine workers and watches them."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import llmd
from llmd.engine.checkpoint import resolve_model
from llmd.engine.worker import RankSpec

from . import inventory
from .discovery import Advert, Advertiser, open_zeroconf
from .net import engine_env, worker_failure
from .security import Verifier


class RankAssignment(BaseModel):
    rank: int = Field(ge=1)
    device: str = Field(pattern=r"^(cpu|cuda:\d+)$")


class LaunchRequest(BaseModel):
    launch_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    master_addr: str = Field(min_length=7, max_length=45)
    master_port: int = Field(ge=1, le=65535)
    model: str = Field(min_length=1, max_length=4096)
    plan: dict
    ranks: list[RankAssignment] = Field(min_length=1)
    context: int = Field(ge=2)
    timeout_s: float = Field(gt=0, le=3600)
    compile: bool = False


class StopRequest(BaseModel):
    launch_id: str


@dataclass
class WorkerProcess:
    launch_id: str
    rank: int
    device: str
    proc: subprocess.Popen
    log: Path

    def status(self) -> dict:
        code = self.proc.poll()
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return {"launch_id": self.launch_id, "rank": self.rank, "device": self.device, "pid": self.proc.pid,
                "running": code is None, "exit_code": code, "last_line": worker_failure(text)}


@dataclass
class AgentState:
    agent_id: str
    name: str
    address: str
    devices: list[str]  # what this agent offers, e.g. ["cpu", "cpu"] or ["cuda:0", "cuda:1"]
    verifier: Verifier
    threads: int | None = None  # torch threads per CPU worker; None: cores / CPU workers
    memory_cap_mb: int | None = None  # the most RAM the CPU workers may use, all together
    workers: list[WorkerProcess] = field(default_factory=list)
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
        model_dir = resolve_model(req.model)
        world = len(req.plan["ranks"])
        cpu_workers = sum(1 for r in req.ranks if r.device == "cpu")
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(cpu_workers, 1))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **engine_env(self.address))
        started = []
        with self.lock:
            for r in req.ranks:
                if not 0 < r.rank < world:
                    raise ValueError(f"rank {r.rank} is outside a world of {world}")
                if r.device not in self.devices:
                    raise ValueError(f"this agent offers {self.devices}, not {r.device}")
                spec = RankSpec(model_dir=str(model_dir), plan=req.plan, rank=r.rank, device=r.device,
                                context=req.context, threads=threads, timeout_s=req.timeout_s, compile=req.compile)
                log = self.logdir / f"{req.launch_id}-rank{r.rank}.log"
                cmd = [sys.executable, "-m", "llmd.engine.worker", "--spec", spec.to_json(),
                       "--master", f"{req.master_addr}:{req.master_port}"]
                with open(log, "w") as f:
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                w = WorkerProcess(req.launch_id, r.rank, r.device, proc, log)
                self.workers.append(w)
                started.append(w.status())
        return started

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


def create_app(state: AgentState) -> FastAPI:
    app = FastAPI(title="llmd agent", version=llmd.__version__)

    @app.middleware("http")
    async def require_signature(request: Request, call_next):
        body = await request.body()
        why = state.verifier.check(request.method, request.url.path, request.headers, body)
        if why:
            return JSONResponse({"error": why}, status_code=401)
        return await call_next(request)

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
        except Exception as e:  # a bad model path, a rank out of range: the host shows this line
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=400)

    @app.post("/v1/stop")
    def stop(req: StopRequest):
        return {"stopped": state.stop(req.launch_id)}

    @app.get("/v1/workers")
    def workers():
        return {"workers": [w.status() for w in state.workers]}

    return app


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
              threads: int | None = None, memory_cap_mb: int | None = None) -> None:
    inv = inventory.read_inventory()
    devices = offered_devices(devices_spec, inv)
    state = AgentState(agent_id=uuid.uuid4().hex, name=name, address=address, devices=devices,
                       verifier=Verifier(secret), threads=threads, memory_cap_mb=memory_cap_mb)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    port = sock.getsockname()[1]
    cpu_n = devices.count("cpu")
    advert = Advert(agent_id=state.agent_id, name=name, version=llmd.__version__,
                    devices=inventory.device_summary(inv, cpu_n), device_count=len(devices),
                    free_mb=sum(state.device_free_mb()), address=address, port=port)
    if not inv.gpus:
        print(f"llmd agent: {inv.note}", flush=True)
    server = QuietServer(uvicorn.Config(create_app(state), log_level="warning"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    zc = open_zeroconf(address)
    advertiser = Advertiser(zc, advert)
    advertiser.register()
    print(f"llmd agent {name} listening on {address}:{port}, offering {advert.devices}", flush=True)
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
