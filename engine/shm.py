"""All-reduce through shared memory, for ranks on one machine.

Over loopback, gloo's all-reduce of a decode step's hidden state costs hundreds of
microseconds, and a step makes two per layer. Here each rank writes its partial
sum into its row of a shared buffer, publishes a sequence number, waits until
every peer has published the same one, then sums the rows in rank order, so
every rank gets bit-identical results. A waiting rank spins (for long where each
rank has a core of its own, briefly where ranks outnumber cores), then sleeps on
its eventfd, which every publisher pokes: more ranks than cores then costs a
wake-up, not a stolen time slice.

Two buffers alternate by sequence parity: a rank can only start writing call n+2
after every peer has published n+1, that is after they all finished reading n.
Publishing relies on x86's store ordering (data before flag); elsewhere the
engine keeps gloo.
"""

import mmap
import os
import platform
import select
import sys
import time
from pathlib import Path

import torch

from .errors import WorkerLost

LINE = 64  # bytes: one flag per cache line, so ranks don't contend on a line
MAX_ELEMS = 1 << 16  # larger messages (prefill) go through gloo, where bandwidth, not wake-ups, matters
SPIN_S = 50e-6  # how long to spin before sleeping when ranks outnumber cores: about what a wake-up costs
# With a core each, a rank spins through the usual gap between its peers' arrivals (the two halves of a
# layer differ between ranks by up to a few hundred microseconds): a sleep and a wake-up cost more than
# that on a virtual machine. 2 workers on 2 cores: decode 15% faster than spinning 50 us (medians of 3).
SPIN_OWN_CORE_S = 2e-3


def available() -> bool:
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64") and Path("/dev/shm").is_dir()


def make_wake_fds(world_size: int) -> list[int]:
    """One eventfd per rank, created before the workers are spawned so they inherit them."""
    return [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(world_size)]


def region_size(world_size: int) -> int:
    return world_size * LINE + 2 * world_size * MAX_ELEMS * 4


def create_region(path: str, world_size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(region_size(world_size))


def process_running(pid: int) -> bool:
    """True while `pid` runs; a killed child its parent has not reaped yet is a zombie, not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class SharedMemoryReducer:
    def __init__(self, path: str, wake_fds: list[int], rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.wake_fds = wake_fds
        self.peers = [r for r in range(world_size) if r != rank]
        self.spin_s = SPIN_OWN_CORE_S if world_size <= len(os.sched_getaffinity(0)) else SPIN_S
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), region_size(world_size))
        words = memoryview(self._map).cast("q")
        self._flags = words  # flag of rank r at word r * 8, its pid at word r * 8 + 1
        self._data = torch.frombuffer(self._map, dtype=torch.float32, offset=world_size * LINE,
                                      count=2 * world_size * MAX_ELEMS).view(2, world_size, MAX_ELEMS)
        words[rank * 8 + 1] = os.getpid()
        self.seq = 0

    def fits(self, t: torch.Tensor) -> bool:
        return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() <= MAX_ELEMS and t.is_contiguous()

    def all_reduce(self, t: torch.Tensor) -> None:
        n = t.numel()
        self.seq += 1
        rows = self._data[self.seq % 2]  # [world, MAX_ELEMS]
        rows[self.rank, :n].copy_(t.view(-1))
        self._flags[self.rank * 8] = self.seq
        for r in self.peers:
            os.eventfd_write(self.wake_fds[r], 1)
        self._wait_for_peers()
        torch.sum(rows[:, :n], dim=0, out=t.view(-1))

    def _published(self) -> bool:
        flags, seq = self._flags, self.seq
        return all(flags[r * 8] >= seq for r in self.peers)

    def _wait_for_peers(self) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < self.spin_s:
            if self._published():
                return
        mine = self.wake_fds[self.rank]
        deadline = time.monotonic() + self.timeout_s
        while not self._published():
            # A peer publishes before it pokes us, so a poke can't be missed between check and sleep.
            if select.select([mine], [], [], 0.5)[0]:
                try:
                    os.eventfd_read(mine)
                except BlockingIOError:
                    pass
                continue
            self._check_peers_alive()
            if time.monotonic() > deadline:
                raise WorkerLost(f"rank {self.rank}: peers did not reach all-reduce {self.seq} in {self.timeout_s:.0f} s")

    def _check_peers_alive(self) -> None:
        for r in self.peers:
            pid = self._flags[r * 8 + 1]
            if pid and not process_running(pid):
                raise WorkerLost(f"rank {r} (pid {pid}) is gone")

    def close(self) -> None:
        self._data = None
        self._flags.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor view still points at it; the mapping goes with the process
