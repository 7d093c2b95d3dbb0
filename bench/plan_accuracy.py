"""How well the planner's speed model predicts this engine, on this machine's CPU.

One run: measure llmd's decode tokens/s on the bundled model for 1-3 workers in 1 or 2
pipeline stages; calibrate once, from the 1-worker run, the device's effective bandwidth
(weight bytes per token x tokens/s), and measure the link latency of the transports the
engine uses (the shared-memory all-reduce inside one stage, gloo over loopback between
stages); then ask the planner (engine/partition.py) for each shape and print predicted vs
measured, with the error. Workers on one machine share its memory bus, so each of n
workers is given 1/n of the calibrated bandwidth.

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


def predict(cfg, workers: int, stages: int, bandwidth_gb_s: float, latency_us: float) -> float:
    devices = [Device("local", "cpu", 24.0, bandwidth_gb_s / workers, 0.1) for _ in range(workers)]
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
    shm_us = gloo_us / 10  # the shared-memory all-reduce: ~an order of magnitude below gloo (engine/shm.py)
    print(f"calibration: {bandwidth:.1f} GB/s effective (1 worker), gloo one-way {gloo_us:.0f} us, "
          f"shared-memory all-reduce taken as {shm_us:.0f} us")
    print(f"{'workers':>7} {'stages':>6} {'measured':>9} {'predicted':>9} {'error':>7}")
    errors = []
    for (workers, stages), got in measured.items():
        latency = shm_us if stages == 1 else gloo_us
        want = predict(cfg, workers, stages, bandwidth, latency)
        errors.append(abs(want - got) / got)
        print(f"{workers:>7} {stages:>6} {got:>9.1f} {want:>9.1f} {(want - got) / got:>+7.0%}")
    print(f"largest error {max(errors):.0%} (target: within 30%)")


if __name__ == "__main__":
    main()
