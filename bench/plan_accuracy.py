"""How well the planner's speed model predicts this engine, on this machine's CPU.

One run: measure llmd's decode tokens/s on the bundled model for 1-3 workers in 1 or 2
pipeline stages; calibrate once, from the 1-worker run, the device's effective bandwidth
(weight bytes per token x tokens/s), and measure the link latency of the transports the
engine uses (a shared-memory all-reduce among 2 and 3 processes inside one stage, gloo
send/recv over loopback between stages); then ask the planner (engine/partition.py) for each shape and print predicted vs
measured, with the error. Workers on one machine share its memory bus: the n ranks of a
stage, which run at the same time, each get 1/n of the calibrated bandwidth.

    python bench/plan_accuracy.py [--new-tokens 64]
"""

import argparse
import os
import statistics
import time

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


def measure(model_dir, cfg, prompt_ids, workers: int, stages: int, new_tokens: int) -> float:
    plan = make_pipeline_plan(cfg, [1.0] * workers, stages)
    spec = RankSpec(model_dir=str(model_dir), plan=plan.to_dict(), rank=0, threads=max(1, CORES // workers),
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
    t = torch.zeros(576)
    for i in range(1200):
        if i == 200:
            start = time.perf_counter()
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        else:
            dist.recv(t, 0)
            dist.send(t, 0)
    if rank == 0:
        out.put((time.perf_counter() - start) / 1000 / 2 * 1e6)  # one way, microseconds
    dist.destroy_process_group()


def gloo_latency_us() -> float:
    from llmd.app.net import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_ping, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    value = out.get(timeout=120)
    for p in procs:
        p.join()
    return value


def _reduce(rank: int, world: int, path: str, fds: list[int], out) -> None:
    import torch

    from llmd.engine.shm import SharedMemoryReducer

    torch.set_num_threads(1)
    reducer = SharedMemoryReducer(path, fds, rank, world, timeout_s=60)
    t = torch.zeros(576)
    for i in range(1200):
        if i == 200:
            start = time.perf_counter()
        reducer.all_reduce(t)
    if rank == 0:
        out.put((time.perf_counter() - start) / 1000 * 1e6)


def shm_all_reduce_us(world: int) -> float:
    """One shared-memory all-reduce of a hidden state among `world` processes, microseconds."""
    from llmd.engine import shm

    path = f"/dev/shm/llmd-bench-{os.getpid()}"
    shm.create_region(path, world)
    fds = shm.make_wake_fds(world)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reduce, args=(r, world, path, fds, out)) for r in range(world)]
    for p in procs:
        p.start()
    value = out.get(timeout=120)
    for p in procs:
        p.join()
    os.unlink(path)
    return value


def predict(cfg, workers: int, stages: int, bandwidth_gb_s: float, latency_us: float) -> float:
    # At batch 1 the stages run one after another, so only one stage's ranks share the memory bus.
    concurrent = -(-workers // stages)
    devices = [Device("local", "cpu", 24.0, bandwidth_gb_s / concurrent, 0.1) for _ in range(workers)]
    link = Link("local", "local", 10.0, latency_us, "loopback")
    p = plan_partition(cfg, devices, [link], precision="fp32", context=2048, force_stages=stages)
    return p.predicted["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = resolve_model("default")
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    prompt_ids = TextModel.load(model_dir).chat_ids([{"role": "user", "content": "Tell me about the sea."}])

    measured = {shape: measure(model_dir, cfg, prompt_ids, *shape, args.new_tokens) for shape in SHAPES}
    one_worker_bytes = plan_partition(cfg, [Device("local", "cpu", 24.0, 1.0, 0.1)], precision="fp32",
                                      context=2048).predicted["decode_s"] * 1e9  # bytes read at 1 GB/s
    bandwidth = one_worker_bytes * measured[(1, 1)] / 1e9
    gloo_us = gloo_latency_us()
    shm_us = {n: shm_all_reduce_us(n) for n in (2, 3)}
    print(f"calibration: {bandwidth:.1f} GB/s effective (1 worker), gloo one-way {gloo_us:.0f} us, "
          f"shared-memory all-reduce {shm_us[2]:.0f} us (2 ranks), {shm_us[3]:.0f} us (3 ranks)")
    print(f"{'workers':>7} {'stages':>6} {'measured':>9} {'predicted':>9} {'error':>7}")
    errors = []
    for (workers, stages), got in measured.items():
        # The planner's all-reduce costs 2 (n-1) link latencies; the measured call is the whole all-reduce.
        latency = shm_us[workers] / (2 * (workers - 1)) if stages == 1 and workers > 1 else gloo_us
        want = predict(cfg, workers, stages, bandwidth, latency)
        errors.append(abs(want - got) / got)
        print(f"{workers:>7} {stages:>6} {got:>9.1f} {want:>9.1f} {(want - got) / got:>+7.0%}")
    print(f"largest error {max(errors):.0%} (target: within 30%)")


if __name__ == "__main__":
    main()
