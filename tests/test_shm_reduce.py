"""The shared-memory all-reduce: right sums, identical on every rank, and no hang when a peer dies."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llmd.engine import shm
from llmd.engine.errors import WorkerLost

pytestmark = pytest.mark.skipif(not shm.available(), reason="shared-memory all-reduce needs Linux on x86-64")

# A rank: a fresh process handed the wake fds, as the launcher starts workers. (Forked from pytest,
# whose other tests leave threads behind, a child can inherit a lock held mid-fork and hang.)
RANK = """
import sys, time, torch
from llmd.engine import shm
path, fds, rank, world, steps, out = sys.argv[1:]
rank, world, steps = int(rank), int(world), int(steps)
torch.set_num_threads(1)
reducer = shm.SharedMemoryReducer(path, [int(f) for f in fds.split(",")], rank, world, timeout_s=30)
print("ready", flush=True)  # its pid is registered with the peers
if steps == 0:
    time.sleep(60)
g = torch.Generator().manual_seed(rank)
results = []
for step in range(steps):
    n = 1 + (step * 97) % 3000  # sizes vary, as prefill and decode steps do
    t = torch.randn(n, generator=g)
    reducer.all_reduce(t)
    results.append(t)
torch.save(results, out)
"""


def start_rank(path: str, fds: list[int], rank: int, world: int, steps: int, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RANK, path, ",".join(map(str, fds)), str(rank), str(world),
                             str(steps), str(out)], stdout=subprocess.PIPE, text=True, pass_fds=fds)


@pytest.fixture
def region(tmp_path):
    def make(world):
        path = f"/dev/shm/llmd-test-{os.getpid()}-{world}"
        shm.create_region(path, world)
        return path, shm.make_wake_fds(world)

    made = []
    yield lambda world: made.append(make(world)) or made[-1]
    for path, fds in made:
        os.unlink(path)
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("world", [2, 3])
def test_sums_match_and_are_identical_on_every_rank(region, world, tmp_path):
    path, fds = region(world)
    steps = 200
    procs = [start_rank(path, fds, r, world, steps, tmp_path / f"rank{r}.pt") for r in range(world)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # What each rank contributed, regenerated from its seed.
    gens = [torch.Generator().manual_seed(r) for r in range(world)]
    for step in range(steps):
        n = 1 + (step * 97) % 3000
        expected = torch.stack([torch.randn(n, generator=g) for g in gens]).sum(0)
        torch.testing.assert_close(results[0][step], expected)
        for r in range(1, world):
            assert torch.equal(results[r][step], results[0][step]), "ranks disagree bit for bit"


def test_a_dead_peer_is_an_error_not_a_hang(region, tmp_path):
    path, fds = region(2)
    peer = start_rank(path, fds, 1, 2, 0, tmp_path / "unused.pt")
    try:
        reducer = shm.SharedMemoryReducer(path, fds, 0, 2, timeout_s=30)
        assert peer.stdout.readline().strip() == "ready"
    finally:
        os.kill(peer.pid, signal.SIGKILL)
        peer.wait()
    start = time.monotonic()
    with pytest.raises(WorkerLost, match="rank 1"):
        reducer.all_reduce(torch.ones(8))
    assert time.monotonic() - start < 5


def test_large_messages_are_left_to_gloo(region):
    path, fds = region(2)
    reducer = shm.SharedMemoryReducer(path, fds, 0, 2, timeout_s=1)
    assert reducer.fits(torch.zeros(576))
    assert not reducer.fits(torch.zeros(shm.MAX_ELEMS + 1))
    assert not reducer.fits(torch.zeros(8, dtype=torch.bfloat16))
