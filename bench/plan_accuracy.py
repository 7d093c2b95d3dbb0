"""How well the planner's speed model predicts this engine, on this machine's CPU.

One run: measure llmd's decode tokens/s on the bundled model for 1-3 workers in 1 to 3
pipeline stages, after calibrating once what the planner needs to know about this machine:
  - the device's speed: weight bytes per token x tokens/s of 1 worker, with 1 thread and with
    every core;
  - all-reduce: a shared-memory all-reduce of a hidden state among 2 and 3 processes, each with
    a typical decode segment of work (~0.3 ms) between two, so that what a late or descheduled
    process costs the others is counted;
  - gloo over loopback: one-way latency and bandwidth (between stages, and the driver's step
    header and logits).
Then ask the planner (engine/partition.py) for each shape and print predicted vs measured.

The planner knows devices, not that these "devices" are processes sharing 2 cores, so the
bench describes each rank as a device: alone in its stage it has its threads; with others
(at batch 1 the stages run one after another, so only one stage's ranks run at a time) they
share the machine's bandwidth. One host per stage.

    python bench/plan_accuracy.py [--new-tokens 64]
"""

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch.multiprocessing as mp

from llmd.app.launch import LocalCluster
from llmd.app.text import TextModel
from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.partition import Device, Link, plan_partition
from llmd.engine.plan import make_pipeline_plan
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec

SHAPES = [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (3, 3)]  # (workers, stages)
CORES = os.cpu_count() or 1


def threads_for(workers: int) -> int:
    return max(1, CORES // workers)  # what `llmd generate` gives each local rank


def measure(model_dir, cfg, prompt_ids, workers: int, stages: int, new_tokens: int, threads: int | None = None) -> float:
    plan = make_pipeline_plan(cfg, [1.0] * workers, stages)
    spec = RankSpec(model_dir=str(model_dir), plan=plan.to_dict(), rank=0, threads=threads or threads_for(workers),
                    compile=True)
    params = SamplingParams(max_new_tokens=new_tokens + 1, greedy=True)
    with LocalCluster(spec, workers) as cluster:
        cluster.driver.generate(prompt_ids, params)  # warm-up
        return statistics.median(cluster.driver.generate(prompt_ids, params).decode_tokens_per_s for _ in range(3))


def _ping(rank: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for numel, repeats, key in ((576, 1000, "latency"), (1 << 20, 50, "bandwidth")):
        t = torch.zeros(numel)
        for i in range(repeats + 20):
            if i == 20:
                start = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
        one_way = (time.perf_counter() - start) / repeats / 2
        if rank == 0:
            out.put((key, one_way))
    dist.destroy_process_group()


def gloo_link() -> tuple[float, float]:
    """(one-way latency in microseconds, GB/s) of gloo send/recv between 2 processes over loopback."""
    from llmd.app.net import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_ping, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join()
    latency = got["latency"]
    return latency * 1e6, 4 * (1 << 20) / (got["bandwidth"] - latency) / 1e9


def _reduce(rank: int, world: int, path: str, fds: list[int], work_s: float, out) -> None:
    import torch

    from llmd.engine.shm import SharedMemoryReducer

    torch.set_num_threads(1)
    reducer = SharedMemoryReducer(path, fds, rank, world, timeout_s=60)
    t = torch.zeros(576)

    def segment():
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:  # busy, like a decode segment streaming weights
            pass

    for i in range(500):
        if i == 100:
            start = time.perf_counter()
        segment()
        reducer.all_reduce(t)
    if rank == 0:
        out.put(((time.perf_counter() - start) / 400 - work_s) * 1e6)


def shm_all_reduce_us(world: int, work_s: float = 3e-4) -> float:
    """What one shared-memory all-reduce among `world` busy processes costs each, microseconds."""
    from llmd.engine import shm

    path = f"/dev/shm/llmd-bench-{os.getpid()}"
    shm.create_region(path, world)
    fds = shm.make_wake_fds(world)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reduce, args=(r, world, path, fds, work_s, out)) for r in range(world)]
    for p in procs:
        p.start()
    value = out.get(timeout=120)
    for p in procs:
        p.join()
    os.unlink(path)
    return value


@dataclass
class Calibration:
    bandwidth: dict[int, float]  # threads -> GB/s of 1 worker reading the whole model (the device's speed)
    all_reduce_us: dict[int, float]  # processes -> cost of one shared-memory all-reduce among busy ones
    gloo_us: float
    gloo_gb_s: float

    @classmethod
    def measure(cls, model_dir, cfg, prompt_ids, new_tokens: int) -> "Calibration":
        whole = plan_partition(cfg, [Device("local", "cpu", 24.0, 1.0, 0.1)], precision="fp32",
                               context=2048).predicted["decode_s"]  # seconds per token at 1 GB/s
        bandwidth = {t: whole * measure(model_dir, cfg, prompt_ids, 1, 1, new_tokens, threads=t)
                     for t in sorted({1, CORES})}
        latency, gb_s = gloo_link()
        return cls(bandwidth, {n: shm_all_reduce_us(n) for n in (2, 3)}, latency, gb_s)

    def rank_bandwidth(self, active: int, threads: int) -> float:
        """GB/s of one of `active` ranks of a stage running at once: alone it has its threads;
        together they share the machine's memory bus."""
        return self.bandwidth[threads] if active == 1 else self.bandwidth[CORES] / active


def predict(cfg, workers: int, stages: int, cal: Calibration) -> float:
    plan = make_pipeline_plan(cfg, [1.0] * workers, stages)
    devices, links = [], []
    for index, stage in enumerate(plan.stages):
        host, n = f"stage{index}", len(stage.ranks)
        bandwidth = cal.rank_bandwidth(n, threads_for(workers))
        devices += [Device(host, "cpu", 24.0, bandwidth, 0.1) for _ in stage.ranks]
        # The planner's all-reduce costs 2 (n-1) steps; what we measured is the whole all-reduce.
        step_us = cal.all_reduce_us[n] / (2 * (n - 1)) if n > 1 else None
        links.append(Link(host, host, cal.gloo_gb_s, cal.gloo_us, "loopback", allreduce_latency_us=step_us))
    hosts = list(dict.fromkeys(d.host for d in devices))
    links += [Link(a, b, cal.gloo_gb_s, cal.gloo_us, "loopback") for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    p = plan_partition(cfg, devices, links, precision="fp32", context=2048, force_stages=stages)
    return p.predicted["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = resolve_model("default")
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    prompt_ids = TextModel.load(model_dir).chat_ids([{"role": "user", "content": "Tell me about the sea."}])

    cal = Calibration.measure(model_dir, cfg, prompt_ids, args.new_tokens)  # once, before the shapes
    measured = {shape: measure(model_dir, cfg, prompt_ids, *shape, args.new_tokens) for shape in SHAPES}
    print("calibration: 1 worker reads " + ", ".join(f"{bw:.1f} GB/s with {t} thread(s)" for t, bw in cal.bandwidth.items())
          + f"; shared-memory all-reduce among busy processes {cal.all_reduce_us[2]:.0f} us (2), "
          f"{cal.all_reduce_us[3]:.0f} us (3); gloo {cal.gloo_us:.0f} us one way, {cal.gloo_gb_s:.2f} GB/s")
    print(f"{'workers':>7} {'stages':>6} {'measured':>9} {'predicted':>9} {'error':>7}")
    errors = []
    for (workers, stages), got in measured.items():
        want = predict(cfg, workers, stages, cal)
        errors.append(abs(want - got) / got)
        print(f"{workers:>7} {stages:>6} {got:>9.1f} {want:>9.1f} {(want - got) / got:>+7.0%}")
    print(f"largest error {max(errors):.0%} (target: within 30%)")


if __name__ == "__main__":
    main()
