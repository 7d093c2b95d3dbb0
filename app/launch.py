"""Start an engine: rank 0 (the driver) in this process, the other ranks elsewhere.

`Cluster` holds what every launch shares: the rendezvous on this machine's address
(app/rendezvous.py, open while the ranks join), loading rank 0's shard while the others
load theirs, waiting for them and joining their process group (failing fast when one
exits), and the driver.
`LocalCluster` starts the other ranks as child processes; `app/host.py`'s
`RemoteCluster` asks agents to.
"""

import os
import secrets
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from llmd.engine import shm
from llmd.engine.balancer import BalancerConfig
from llmd.engine.comm import JOINING
from llmd.engine.errors import WorkerLost
from llmd.engine.runtime import Driver
from llmd.engine.worker import RankSpec, build_model, connect, load_rank, ready_key

from .options import EngineOptions

from .net import engine_env, worker_failure
from .rendezvous import KEY_ENV, rendezvous_url, worker_command
from .rendezvous_server import Rendezvous


LOAD_TIMEOUT_S = 600.0


class Cluster:
    """Use as a context manager; `driver` runs steps once it is entered."""

    def __init__(self, spec: RankSpec, world_size: int, address: str, balancer: BalancerConfig | None = None):
        self.spec, self.world_size, self.address = spec, world_size, address
        self.balancer = balancer
        self.driver: Driver | None = None
        self.launch_id = uuid.uuid4().hex[:12]
        self.rendezvous_key = secrets.token_hex(32)  # a launch on agents uses the pool secret instead
        self.rendezvous: Rendezvous | None = None
        self.progress_at = 0.0  # when the other ranks last showed progress while loading

    def __enter__(self):
        try:
            self.start()
        except RuntimeError as e:  # torch.distributed: the store or a peer failed while starting
            why = f"the workers could not connect: {str(e).splitlines()[0]}"
            try:
                self.check_workers()  # a rank that exited says why; the timeout is only its symptom
            except WorkerLost as lost:
                why = str(lost)
            self.close()
            raise WorkerLost(why) from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> None:
        # gloo would otherwise bind to whatever the hostname resolves to. The address given wins over an
        # inherited setting (a parent's, or an earlier cluster's in this process), as for the workers.
        os.environ.update(engine_env(self.address))
        store = None
        if self.world_size > 1:
            self.rendezvous = Rendezvous(self.address, self.rendezvous_key, self.launch_id, self.spec.timeout_s)
            store = self.rendezvous.store
            self.start_other_ranks(self.address, self.rendezvous.port)
        loaded = load_rank(self.spec)
        if store is not None:
            self._wait_ready(store)
        model = build_model(self.spec, loaded, self._connect(store))
        self.after_connect()
        self.driver = Driver(model, check_workers=self.check_workers, balancer=self.balancer)
        # Every rank has now joined every group and run a step through it (NCCL makes its communicators on
        # first use, through the store): the rendezvous closes.
        self.driver.warm_up()
        self._close_rendezvous()

    def _close_rendezvous(self) -> None:
        if self.rendezvous is not None:
            self.rendezvous.close()
            self.rendezvous = None

    def _wait_ready(self, store: dist.Store) -> None:
        """Wait for every other rank to load its shard, failing fast if one exits. Starting Python and
        reading a shard may take longer than ranks may wait for each other (`timeout_s`) once running:
        a loaded machine, a large model. A rank still alive gets LOAD_TIMEOUT_S at least."""
        keys = [ready_key(r) for r in range(1, self.world_size)]
        limit = max(self.spec.timeout_s, LOAD_TIMEOUT_S)
        self.progress_at = time.monotonic()
        while not store.check(keys):
            self.check_workers()
            # A rank fetching its slices from this host moves the deadline on each time it gets some.
            if time.monotonic() > self.progress_at + limit:
                raise WorkerLost(f"workers did not load their shards within {limit:.0f} s")
            time.sleep(0.05)

    def _connect(self, store: dist.Store | None):
        """Join the other ranks' process group, failing as soon as one of them exits: gloo would go on
        retrying a dead rank's address for minutes, well past the group's timeout. The abandoned join
        ends on gloo's own timeout; a group it still completes is closed, not left set in this process."""
        lock, joined = threading.Lock(), {}

        def join():
            with JOINING:  # held until an abandoned group is closed, too
                try:
                    comm = connect(self.spec, store, self.world_size)
                except BaseException as e:  # raised below, in the caller's thread
                    joined["error"] = e
                    return
                with lock:
                    if joined.get("abandoned"):
                        comm.close()
                    else:
                        joined["comm"] = comm

        thread = threading.Thread(target=join, name="llmd-connect", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.25)
                if thread.is_alive():
                    self.check_workers()
        except BaseException:
            with lock:
                joined["abandoned"] = True
                if "comm" in joined:
                    joined["comm"].close()
            raise
        if "error" in joined:
            raise joined["error"]
        return joined["comm"]

    def close(self) -> None:
        if self.driver is not None:
            try:
                self.check_workers()
                self.driver.shutdown()
            except (RuntimeError, WorkerLost):
                pass  # a worker is already gone; stop_other_ranks ends the rest
            self.driver.comm.close()
            self.driver = None
        self._close_rendezvous()
        self.stop_other_ranks()

    # What a kind of cluster defines.
    def start_other_ranks(self, address: str, port: int) -> None:
        raise NotImplementedError

    def after_connect(self) -> None:
        pass

    def check_workers(self) -> None:
        """Raise WorkerLost, naming the rank, when another rank has exited."""

    def stop_other_ranks(self) -> None:
        pass

    def fetched(self) -> list:
        """What agents fetched of the model for this launch (app/host.py `Fetch`): none for local workers."""
        return []


class LocalCluster(Cluster):
    """N ranks on this machine over loopback, sharing memory for small all-reduces."""

    def __init__(self, spec: RankSpec, world_size: int, balancer: BalancerConfig | None = None):
        super().__init__(spec, world_size, "127.0.0.1", balancer)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self._shm_paths: list[str] = []
        self._stage_shm: dict[int, tuple[str, list[int]]] = {}  # rank -> its stage's region and wake fds
        self._wake_fds: list[int] = []
        self._logdir = tempfile.TemporaryDirectory(prefix="llmd-workers-")

    def start_other_ranks(self, address: str, port: int) -> None:
        if self.spec.device == "cpu" and shm.available():
            self._share_memory()
        for rank in range(1, self.world_size):
            self._spawn(self._rank_spec(rank), rendezvous_url(address, port))

    def _share_memory(self) -> None:
        """One shared-memory region per pipeline stage of several ranks, for its all-reduces."""
        self._wake_fds = shm.make_wake_fds(self.world_size)  # one per rank, inherited by every worker
        for index, stage in enumerate(self.spec.plan["stages"]):
            if len(stage["ranks"]) > 1:
                path = f"/dev/shm/llmd-{os.getpid()}-{uuid.uuid4().hex[:8]}-s{index}"
                shm.create_region(path, len(stage["ranks"]))
                self._shm_paths.append(path)
                self._stage_shm.update({r: (path, [self._wake_fds[x] for x in stage["ranks"]]) for r in stage["ranks"]})
        self.spec = self._rank_spec(0)

    def _rank_spec(self, rank: int) -> RankSpec:
        path, fds = self._stage_shm.get(rank, (None, None))
        return EngineOptions.of(self.spec).rank_spec(self.spec.model_dir, rank, self.spec.threads,
                                                     shm_path=path, wake_fds=fds)

    def _spawn(self, spec: RankSpec, url: str) -> None:
        log = Path(self._logdir.name) / f"rank{spec.rank}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **engine_env(self.address), **{KEY_ENV: self.rendezvous_key})
        cmd = worker_command(spec, url, self.launch_id)
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                               stdin=subprocess.DEVNULL, pass_fds=self._wake_fds))
        self.logs.append(log)

    def after_connect(self) -> None:
        self._unlink_shm()  # every rank has mapped it by now; the mappings outlive the name

    def _unlink_shm(self) -> None:
        for path in self._shm_paths:
            Path(path).unlink(missing_ok=True)
        self._shm_paths = []

    def check_workers(self) -> None:
        for rank, (proc, log) in enumerate(zip(self.procs, self.logs, strict=True), start=1):
            code = proc.poll()
            if code is not None:
                line = worker_failure(log.read_text(errors="replace"))
                why = f": {line}" if line else ""
                raise WorkerLost(f"worker rank {rank} exited with code {code}{why}")

    def stop_other_ranks(self) -> None:
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
