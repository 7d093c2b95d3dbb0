"""Collectives, called explicitly from the model's forward.

`Solo` is a world of one: every collective is free. `Group` wraps a
torch.distributed process group (gloo on CPU, NCCL on CUDA) plus a gloo group
for the driver's control messages, which may wait indefinitely between chats
while compute collectives stay bounded by the group's timeout. Ranks on one
machine all-reduce small messages through shared memory (engine/shm.py).
"""

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .shm import SharedMemoryReducer


# torch.distributed holds one process group per process: a join given up on (the launcher saw a rank
# die) must end, on gloo's timeout, and its group be closed, before the next one in this process starts.
JOINING = threading.RLock()


class Solo:
    rank = 0
    world_size = 1
    stage_size = 1

    def all_reduce(self, t: torch.Tensor) -> None:
        pass

    def gather_to_driver(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        return t

    def broadcast_control(self, t: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class Group:
    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device, timeout_s: float,
                 stages: list[list[int]], shm_path: str | None = None, wake_fds: list[int] | None = None):
        mine = next(i for i, ranks in enumerate(stages) if rank in ranks)
        self.stage_size = len(stages[mine])
        # The stage's ranks on this machine share a memory region: rank `i` of the stage is slot `i`.
        # Mapped before joining the group: the launcher unlinks its name once every rank has joined.
        local = stages[mine].index(rank)
        self.shm = SharedMemoryReducer(shm_path, wake_fds, local, self.stage_size, timeout_s) if shm_path else None
        self.rank, self.world_size, self.device = rank, world_size, device
        with JOINING:
            try:
                self._join(store, stages, mine, timeout_s)
            except BaseException:
                self.close()  # a group joined halfway stays set in this process otherwise: the next launch fails
                raise

    def _join(self, store: dist.Store, stages: list[list[int]], mine: int, timeout_s: float) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=timeout_s)
        )
        # Idle time between requests is unbounded; a dead peer still breaks the socket at once. Joining it
        # is bounded like the others (gloo would wait as long for a peer that died while joining).
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        dist.distributed_c10d._set_pg_timeout(timedelta(days=365), self.control)
        # The balancer's KV transfers run in a background thread while steps go on: their own group.
        self.migration = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        # Head-shard all-reduces stay inside a pipeline stage; every rank creates every group, in order.
        groups = [dist.new_group(ranks) if len(stages) > 1 else dist.group.WORLD for ranks in stages]
        self.stage_group = groups[mine]

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.stage_size == 1:
            return
        if self.shm is not None and self.shm.fits(t):
            self.shm.all_reduce(t)
        else:
            dist.all_reduce(t, group=self.stage_group)

    def send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t.contiguous(), dst)

    def recv(self, t: torch.Tensor, src: int) -> None:
        dist.recv(t, src)

    def send_migration(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t.cpu().contiguous(), dst, group=self.migration)

    def recv_migration(self, t: torch.Tensor, src: int) -> None:
        if t.device.type == "cpu":
            dist.recv(t, src, group=self.migration)
            return
        staging = torch.empty_like(t, device="cpu")  # the migration group is gloo, on every backend
        dist.recv(staging, src, group=self.migration)
        t.copy_(staging)

    def gather_to_driver(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Concatenate each rank's last-dim slice (of widths `sizes`) on rank 0; None elsewhere."""
        width = max(sizes)
        padded = torch.nn.functional.pad(t, (0, width - t.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def broadcast_control(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.control)

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        else:
            forget_failed_join()


def forget_failed_join() -> None:
    """A failed `init_process_group` leaves torch's counter of group names advanced (only destroying a
    joined default group resets it), so the next join in this process would look for its peers under
    other names than its fresh workers use."""
    world = getattr(dist.distributed_c10d, "_world", None)
    if world is not None and hasattr(world, "group_count"):
        world.group_count = 0
