"""Bring up one rank: load its slices, join the process group, and (for workers) serve steps.

A worker process (the app layer's `worker` module) runs `run_worker` with the rendezvous store it
reached; the driver runs `load_rank`, `connect` and `build_model` in its own process as rank 0.
"""

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .comm import Group, Solo
from .config import ModelConfig, load_hf_config
from .checkpoint import SliceReader
from .model import ShardedModel, Slowdown, load_shard
from .plan import Plan
from .runtime import large_allocations_mapped, peak_rss_mb, reset_peak_rss, rss_mb, serve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RankSpec:
    model_dir: str
    plan: dict
    rank: int
    device: str = "cpu"
    dtype: str = "float32"
    weights: str = "fp32"  # fp32, bf16, fp16, or int8 / int4 quantised at load (engine/quant.py)
    context: int = 2048
    slots: int = 1
    threads: int = 1
    timeout_s: float = 120.0
    compile: bool = False  # compile the decode step (CPU: needs a C++ compiler)
    shm_path: str | None = None  # shared-memory all-reduce region of its stage, when the stage is on one machine
    wake_fds: list[int] | None = None  # with it: an inherited eventfd per rank (engine/shm.py)
    slowdown: list[list[float]] | None = None  # [rank, factor, from step] triples: simulated slow devices
    reshardable: bool = False  # the balancer may move heads and columns: compile for changing shapes

    def slowdown_of(self, rank: int) -> Slowdown:
        for r, factor, from_step in self.slowdown or []:
            if int(r) == rank:
                return Slowdown(factor, int(from_step))
        return Slowdown()

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def device_of(spec: RankSpec) -> torch.device:
    """"cpu", "cuda:I", or plain "cuda": one GPU per local rank."""
    if spec.device == "cuda":
        return torch.device("cuda", spec.rank % torch.cuda.device_count())
    return torch.device(spec.device)


def ready_key(rank: int) -> str:
    return f"llmd/ready/{rank}"


def load_rank(spec: RankSpec, open_reader=SliceReader):
    """Load this rank's slices (through `open_reader`, engine/model.py `load_shard`); returns what
    `build_model` needs."""
    torch.set_num_threads(spec.threads)
    reset_peak_rss()
    before = rss_mb()
    hf_config = load_hf_config(Path(spec.model_dir))
    cfg = ModelConfig.from_hf(hf_config)
    plan = Plan.from_dict(spec.plan)
    device, dtype = device_of(spec), DTYPES[spec.dtype]
    with large_allocations_mapped():
        weights = load_shard(Path(spec.model_dir), cfg, plan, spec.rank, dtype, device, weights=spec.weights,
                             open_reader=open_reader)
    return cfg, hf_config, plan, weights, device, dtype, (before, peak_rss_mb())


def build_model(spec: RankSpec, loaded, comm, open_reader=SliceReader) -> ShardedModel:
    cfg, hf_config, plan, weights, device, dtype, load_memory_mb = loaded
    model = ShardedModel(cfg, hf_config, plan, spec.rank, weights, comm, spec.context, spec.slots, dtype, device,
                         compiled=spec.compile, slowdown=spec.slowdown_of(spec.rank), reshardable=spec.reshardable)
    model.load_memory_mb = load_memory_mb
    # The balancer's new shards come from this rank's own slices, read where its first shard was.
    model.load = lambda new_plan, after_layer=None, reuse=None: load_shard(
        Path(spec.model_dir), cfg, new_plan, spec.rank, dtype, device, after_layer, reuse, spec.weights, open_reader)
    return model


def connect(spec: RankSpec, store: dist.Store | None, world_size: int):
    if world_size == 1:
        return Solo()
    store.set(ready_key(spec.rank), "1")
    stages = [st["ranks"] for st in spec.plan["stages"]]
    return Group(store, spec.rank, world_size, device_of(spec), spec.timeout_s, stages, spec.shm_path, spec.wake_fds)


def exit_with_parent() -> None:
    """A worker outlives nothing: when the process that started it (driver or agent) is gone,
    however it died, the worker ends too. (PR_SET_PDEATHSIG fires when the starting *thread*
    exits, which in an agent's thread pool happens mid-generation.)"""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="llmd-parent-watch", daemon=True).start()


def run_worker(spec: RankSpec, open_store: Callable[[], dist.Store], open_reader=SliceReader) -> int:
    """A worker rank's life: load its slices, join the group through the store `open_store` gives, serve
    steps until the driver says stop. Its last line says why when it fails (the driver reads it)."""
    world_size = len(spec.plan["ranks"])
    try:
        loaded = load_rank(spec, open_reader)
        model = build_model(spec, loaded, connect(spec, open_store(), world_size), open_reader)
        serve(model)
        model.comm.close()
    except Exception as e:
        print(f"llmd worker rank {spec.rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def spec_from_json(text: str) -> RankSpec:
    return RankSpec(**json.loads(text))
