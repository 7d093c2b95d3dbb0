"""The shared-memory all-reduce: right sums, identical on every rank, and no hang when a peer dies."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from llmd.engine import shm
from llmd.engine.errors import WorkerLost

pytestmark = pytest.mark.skipif(not shm.available(), reason="shared-memory all-reduce needs Linux on x86-64")


def reduce_many(rank, world, path, fds, steps, out):
    torch.set_num_threads(1)
    reducer = shm.SharedMemoryReducer(path, fds, rank, world, timeout_s=30)
    g = torch.Generator().manual_seed(rank)
    results = []
    for step in range(steps):
        n = 1 + (step * 97) % 3000  # sizes vary, as prefill and decode steps do
        t = torch.randn(n, generator=g)
        reducer.all_reduce(t)
        results.append(t.numpy())  # by value: the process exits before the parent reads
    out.put((rank, results))


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
def test_sums_match_and_are_identical_on_every_rank(region, world):
    path, fds = region(world)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    steps = 200
    procs = [ctx.Process(target=reduce_many, args=(r, world, path, fds, steps, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    # What each rank contributed, regenerated from its seed.
    expected = []
    gens = [torch.Generator().manual_seed(r) for r in range(world)]
    for step in range(steps):
        n = 1 + (step * 97) % 3000
        parts = [torch.randn(n, generator=g) for g in gens]
        expected.append(torch.stack(parts).sum(0))
    for step in range(steps):
        torch.testing.assert_close(torch.from_numpy(results[0][step]), expected[step])
        for r in range(1, world):
            assert (results[r][step] == results[0][step]).all(), "ranks disagree bit for bit"


def wait_forever(rank, path, fds):
    shm.SharedMemoryReducer(path, fds, rank, 2, timeout_s=30)  # registers this pid with the peers
    time.sleep(60)


def test_a_dead_peer_is_an_error_not_a_hang(region):
    path, fds = region(2)
    ctx = mp.get_context("fork")
    peer = ctx.Process(target=wait_forever, args=(1, path, fds))
    peer.start()
    reducer = shm.SharedMemoryReducer(path, fds, 0, 2, timeout_s=30)
    time.sleep(1.0)  # the peer has registered its pid
    os.kill(peer.pid, signal.SIGKILL)
    peer.join()
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
