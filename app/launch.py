"""Start an engine on this machine: rank 0 (the driver) here, the other ranks as child processes."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from llmd.engine import shm
from llmd.engine.errors import WorkerLost
from llmd.engine.runtime import Driver
from llmd.engine.worker import RankSpec, build_model, connect, load_rank, ready_key


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalCluster:
    """N ranks on this machine over loopback; use as a context manager."""

    def __init__(self, spec: RankSpec, world_size: int):
        self.spec, self.world_size = spec, world_size
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.driver: Driver | None = None
        self._shm_path: str | None = None
        self._wake_fds: list[int] = []
        self._logdir = tempfile.TemporaryDirectory(prefix="llmd-workers-")

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except RuntimeError as e:  # torch.distributed: the store or a peer failed while starting
            self.close()
            raise WorkerLost(f"the workers could not connect: {str(e).splitlines()[0]}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> None:
        host = "127.0.0.1"
        # gloo would otherwise bind to whatever the hostname resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = None
        if self.world_size > 1 and self.spec.device == "cpu" and shm.available():
            path = f"/dev/shm/llmd-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            shm.create_region(path, self.world_size)
            self._shm_path = path
            self._wake_fds = shm.make_wake_fds(self.world_size)
            self.spec = replace(self.spec, shm_path=path, wake_fds=self._wake_fds)
        if self.world_size > 1:
            port = free_port(host)
            store = dist.TCPStore(host, port, self.world_size, is_master=True,
                                  timeout=timedelta(seconds=self.spec.timeout_s), wait_for_workers=False)
            for rank in range(1, self.world_size):
                self._spawn(replace(self.spec, rank=rank), f"{host}:{port}")
        loaded = load_rank(self.spec)
        if store is not None:
            self._wait_ready(store)
        model = build_model(self.spec, loaded, connect(self.spec, store, self.world_size))
        self._unlink_shm()  # every rank has mapped it by now; the mappings outlive the name
        self.driver = Driver(model, check_workers=self.check_workers)
        self.driver.warm_up()

    def _spawn(self, spec: RankSpec, master: str) -> None:
        log = Path(self._logdir.name) / f"rank{spec.rank}.log"
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "llmd.engine.worker", "--spec", spec.to_json(), "--master", master]
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                               stdin=subprocess.DEVNULL, pass_fds=self._wake_fds))
        self.logs.append(log)

    def _wait_ready(self, store: dist.Store) -> None:
        """Wait for every worker to load its shard, failing fast if one exits."""
        keys = [ready_key(r) for r in range(1, self.world_size)]
        deadline = time.monotonic() + self.spec.timeout_s
        while not store.check(keys):
            self.check_workers()
            if time.monotonic() > deadline:
                raise WorkerLost(f"workers did not load their shards within {self.spec.timeout_s:.0f} s")
            time.sleep(0.05)

    def _unlink_shm(self) -> None:
        if self._shm_path:
            Path(self._shm_path).unlink(missing_ok=True)
            self._shm_path = None

    def check_workers(self) -> None:
        for rank, (proc, log) in enumerate(zip(self.procs, self.logs), start=1):
            code = proc.poll()
            if code is not None:
                lines = log.read_text(errors="replace").strip().splitlines()
                why = f": {lines[-1]}" if lines else ""
                raise WorkerLost(f"worker rank {rank} exited with code {code}{why}")

    def close(self) -> None:
        if self.driver is not None:
            try:
                if all(p.poll() is None for p in self.procs):
                    self.driver.shutdown()
            except RuntimeError:
                pass  # a worker is already gone; we kill the rest below
            self.driver.comm.close()
            self.driver = None
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._unlink_shm()
        for fd in self._wake_fds:
            os.close(fd)
        self._wake_fds = []
        self._logdir.cleanup()
