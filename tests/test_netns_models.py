"""A model kept only on the host runs on workstations that have none of it.

Two agents, each in a network namespace of its own and a private mount namespace in which the host's
model folder is an empty directory, receive their slices from the host over the namespaces' LAN: the
engine across the three machines computes transformers' greedy tokens, and each agent's cache holds its
own slices (and the model's small files) and little more. An agent that joins a serving pool fetches the
slices of the next launch at once, and that launch then moves nothing.
"""

import json
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents import generate_json, new_secret, start_agent
from conftest import make_tiny_model
from llmd.app.models import make_manifest
from llmd.engine import sharding
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import Plan
from netns import Lan, requires_netns, stop
from reference import hf_greedy

INDEX_SLACK = 1 << 20  # the cache's own bookkeeping: its SQLite index and write-ahead log


@pytest.fixture(scope="module")
def host_only_model(tmp_path_factory, default_model_dir):
    """The tiny GQA Llama in several files, in a folder the agents will not see."""
    whole = make_tiny_model("llama-gqa", tmp_path_factory.mktemp("whole"), default_model_dir)
    out = tmp_path_factory.mktemp("host-models") / "tiny-llama"
    AutoModelForCausalLM.from_pretrained(whole, dtype=torch.float32).save_pretrained(out, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(whole).save_pretrained(out)
    return out


def without(hidden, cache):
    """Start argv in a namespace host, in a private mount namespace where `hidden` is an empty folder, with
    its cache in `cache`."""
    def run_in(host):
        def start(argv, **kw):
            script = f'mount -t tmpfs none "{hidden}" && exec env LLMD_CACHE_DIR="{cache}" "$@"'
            return host.run_in(["unshare", "-m", "sh", "-c", script, "sh", *argv], **kw)
        return start
    return run_in


def generate(host, model, secret) -> dict:
    out, stderr = generate_json(host.run_in, secret, "--agents", "auto", "--expect", "2", "--address", host.address,
                                "--model", str(model), "--threads", "1", "--compile", "off", "--weights", "fp32",
                                "--greedy", "--max-new-tokens", "8", "--json", "The capital of France is")
    return {**out, "stderr": stderr}


def slice_bytes(model, plan: Plan, rank: int) -> int:
    manifest, cfg = make_manifest(model), ModelConfig.from_hf(load_hf_config(model))
    total = 0
    for r in sharding.reads(cfg, plan, rank, "fp32", set(manifest.tensors)):
        e = manifest.tensors[r.name]
        total += e.nbytes if r.dim is None else e.nbytes // e.shape[r.dim] * sum(b - a for a, b in r.ranges)
    return total


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
@requires_netns
def test_agents_without_the_model_fetch_only_their_own_slices(host_only_model, tmp_path):
    secret = new_secret()
    caches = [tmp_path / f"cache{i}" for i in range(2)]
    with Lan(3) as lan:
        host, *workstations = lan.hosts
        agents = []
        try:
            for i, ws in enumerate(workstations):
                start = without(host_only_model, caches[i])(ws)
                agents.append(start_agent(f"bare{i}", secret, address=ws.address, run_in=start))
            out = generate(host, host_only_model, secret)
            assert out["token_ids"] == hf_greedy(host_only_model, out["prompt_token_ids"], 8)
            plan = Plan.from_dict(out["plan"])
            assert plan.world_size == 3
            assert len(out["fetched"]) == 2 and "fetched" in out["stderr"]
            small = sum(e.size for e in make_manifest(host_only_model).files.values())
            for fetched in out["fetched"]:
                # Agents are ranked by name (bare0, bare1), each after rank 0 on the host.
                (i,) = [i for i, ws in enumerate(workstations) if f"//{ws.address}:" in fetched["agent"]]
                cache, own = caches[i], slice_bytes(host_only_model, plan, i + 1)
                assert own <= fetched["bytes"] == fetched["total"] <= 1.1 * own, (fetched, own)
                chunks = folder_bytes(cache / "fetched" / "chunks")
                assert chunks <= 1.1 * own, (chunks, own)
                models = folder_bytes(cache / "fetched" / "models")
                manifest = len(json.dumps(make_manifest(host_only_model).to_dict()))
                assert small <= models <= small + manifest
                assert folder_bytes(cache) <= chunks + models + INDEX_SLACK

        finally:
            stop(*[a.proc for a in agents])


def hidden_on_loopback(hidden, cache):
    """Start argv on this machine's loopback, in a private mount namespace where `hidden` is an empty folder."""
    def start(argv, **kw):
        script = f'mount -t tmpfs none "{hidden}" && exec env LLMD_CACHE_DIR="{cache}" "$@"'
        return subprocess.Popen(["unshare", "-m", "sh", "-c", script, "sh", *argv], **kw)
    return start


@pytest.mark.slow
def test_a_workstation_that_joins_later_gets_its_slices_while_the_pool_serves(host_only_model, tmp_path):
    """A pool serves on one agent that has the model; a second agent without it joins: it fetches the slices
    the next launch will give it while chats go on, and that launch then moves nothing."""
    from test_pool import chat, make_pool, wait_ready

    secret = new_secret()
    early = start_agent(f"early-{time.monotonic_ns()}", secret)
    late = start_agent(f"late-{time.monotonic_ns()}", secret, run_in=hidden_on_loopback(host_only_model, tmp_path / "c"))
    p = make_pool(tmp_path, workers=0, secret=secret, extra=("--model", str(host_only_model)))
    try:
        p.start(local_agent=False)
        deadline = time.monotonic() + 30
        while {x["name"] for x in p.peers() if x["health"] == "ok"} < {early.name, late.name}:
            assert time.monotonic() < deadline, p.peers()
            time.sleep(0.2)
        p.join(early.name)
        p.relaunch()
        wait_ready(p)
        assert p.engine.spec.plan["world_size"] == 2

        p.join(late.name)  # the engine keeps serving on the early agent while the late one fetches
        deadline, served = time.monotonic() + 120, 0
        while True:
            fetch = next(x["fetch"] for x in p.peers() if x["name"] == late.name)
            if fetch is not None and fetch.total > 0 and fetch.bytes == fetch.total:
                break
            assert time.monotonic() < deadline, fetch
            _, r = chat(p, 2)
            served += r.tokens
        assert served >= 2 and p.progress.ready
        assert next(x["fetch"] for x in p.peers() if x["name"] == early.name).total == 0  # it has the files

        p.relaunch()
        wait_ready(p)
        assert p.engine.spec.plan["world_size"] == 3
        fetched = {x["name"]: x["fetch"] for x in p.peers()}
        assert fetched[late.name].total == 0 and fetched[early.name] is None  # nothing left to move
        _, r = chat(p, 4)
        assert r.tokens == 4
    finally:
        p.close()
        p.store.close()
        stop(early.proc, late.proc)
