"""Models by content, and slices fetched from the host into an agent's cache (app/models.py,
app/model_cache.py): a real signed HTTP server on loopback, a real SQLite index, real files.

A rank that reads through the cache loads exactly what it would read from the files, fetching only its
own slices; a second load fetches nothing, a balancer move fetches only what it gained, a damaged chunk
is fetched again, and a fetch cut short resumes. The namespaced end-to-end run is test_netns_models.py.
"""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model
from llmd.app import model_cache
from llmd.app.model_cache import ChunkCache, HostClient, cover, fetch_for, open_fetched, prepare
from llmd.app.models import MAX_SLICE_BYTES, ModelServer, ModelUnavailable, make_manifest, same_sizes
from llmd.app.security import signed_headers
from llmd.engine import quant, sharding
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.model import load_shard
from llmd.engine.plan import make_plan

CPU = torch.device("cpu")
SECRET = "s" * 64


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, default_model_dir):
    """The tiny GQA Llama in several safetensors files, as large checkpoints ship."""
    whole = make_tiny_model("llama-gqa", tmp_path_factory.mktemp("whole"), default_model_dir)
    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(whole, dtype=torch.float32).save_pretrained(out, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(whole).save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) > 3
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def server(cache_dir):
    s = ModelServer("127.0.0.1", SECRET)
    yield s
    s.close()


def agent_reader(server, model_dir, max_bytes=None, dense="raw"):
    source = server.offer(model_dir)
    local = prepare(source, HostClient(source, SECRET))
    return local, open_fetched(local, source, SECRET, max_bytes, dense)


def same(a, b) -> bool:
    return len(a.tensors()) == len(b.tensors()) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def slice_bytes(cfg, plan, rank, manifest, whole_only=False, only=None) -> int:
    """What a rank's reads weigh in the checkpoint's own precision (`whole_only`: of the tensors every rank
    reads whole, the norms; `only`: of these tensors)."""
    total = 0
    for r in sharding.reads(cfg, plan, rank, "fp32", set(manifest.tensors)):
        if only is not None and r.name not in only:
            continue
        e = manifest.tensors[r.name]
        if r.dim is None:
            total += e.nbytes
        elif not whole_only:
            total += e.nbytes // e.shape[r.dim] * sum(b - a for a, b in r.ranges)
    return total


def test_a_models_id_is_its_content_wherever_it_lives(sharded, tmp_path, cache_dir):
    copy = shutil.copytree(sharded, tmp_path / "elsewhere" / "copy")
    assert make_manifest(copy).id == make_manifest(sharded).id and same_sizes(copy, make_manifest(sharded))
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config + "\n")
    assert make_manifest(copy).id != make_manifest(sharded).id  # one byte more in the config: another model
    assert not same_sizes(copy, make_manifest(sharded))  # seen without hashing the weights
    m = make_manifest(sharded)
    assert {"config.json", "tokenizer.json"} <= set(m.files) and not any(f.endswith(".safetensors") for f in m.files)
    assert len(m.weights) > 3 and "model.layers.2.mlp.down_proj.weight" in m.tensors


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_ranks_read_through_the_cache_what_they_read_from_the_files(sharded, server, weights):
    cfg = ModelConfig.from_hf(load_hf_config(sharded))
    plan = make_plan(cfg, [1, 3])
    local, reader = agent_reader(server, sharded)
    assert not list(local.glob("*.safetensors")) and (local / "tokenizer.json").is_file()
    fetched = 0
    for rank in range(2):
        before = reader.client.bytes
        remote = load_shard(local, cfg, plan, rank, torch.float32, CPU, weights=weights, open_reader=lambda d: reader)
        assert same(remote, load_shard(sharded, cfg, plan, rank, torch.float32, CPU, weights=weights))
        got, held = reader.client.bytes - before, remote.nbytes()
        if weights == "fp32":
            own = slice_bytes(cfg, plan, rank, reader.manifest)
            shared = slice_bytes(cfg, plan, rank, reader.manifest, whole_only=True) if rank else 0  # rank 0's norms
            assert own - shared <= got <= own, (rank, got, own)
        assert got <= 1.1 * held, (rank, got, held)  # int8 slices travel as int8, as they are held
        fetched += got
    assert fetched < reader.manifest.weight_bytes * 1.2


@pytest.mark.parametrize("weights, dtype", [("int4", torch.float32), ("int8", torch.float32),
                                            ("bf16", torch.bfloat16)])
def test_slices_travel_in_the_plans_precision(int4_model, server, weights, dtype):
    """An int4 plan moves 4-bit bytes, an int8 plan 8-bit ones, a bf16 plan of an fp32 checkpoint bf16."""
    cfg = ModelConfig.from_hf(load_hf_config(int4_model))
    plan = make_plan(cfg, [1, 1], column_unit=quant.column_unit(cfg, weights))
    local, reader = agent_reader(server, int4_model, dense="bf16" if dtype == torch.bfloat16 else "raw")
    group = quant.group_size(cfg) if weights == "int4" else None
    for rank in range(2):
        rank_reads = sharding.reads(cfg, plan, rank, weights, set(reader.manifest.tensors))
        wanted = sum(w.nbytes for w in reader.wants(rank_reads, group))
        linear = [r for r in rank_reads  # the layers' weights, which travel in the plan's precision
                  if r.name.startswith("model.layers.") and (r.form != "dense" or weights == "bf16")]
        linear_got = sum(w.nbytes for w in reader.wants(linear, group))
        before = reader.client.bytes
        remote = load_shard(local, cfg, plan, rank, dtype, CPU, weights=weights, open_reader=lambda d: reader)
        assert same(remote, load_shard(int4_model, cfg, plan, rank, dtype, CPU, weights=weights))
        got = reader.client.bytes - before
        assert got == wanted  # what the prefetch asks for is all the load reads
        held = remote.nbytes()  # in the plan's precision
        assert 0.9 * held <= got <= 1.1 * held, (rank, got, held)
        stored = slice_bytes(cfg, plan, rank, reader.manifest, only={r.name for r in linear})  # in fp32
        assert linear_got <= {"int4": 0.16, "int8": 0.27, "bf16": 0.5}[weights] * stored, (linear_got, stored)


def test_a_second_load_fetches_nothing_and_a_move_only_what_it_gained(sharded, server):
    cfg = ModelConfig.from_hf(load_hf_config(sharded))
    old, new = make_plan(cfg, [1, 1]), make_plan(cfg, [1, 3])  # rank 1 gains heads, columns and rows
    local, reader = agent_reader(server, sharded)
    first = load_shard(local, cfg, old, 1, torch.float32, CPU, open_reader=lambda d: reader)
    start = reader.client.bytes
    again = load_shard(local, cfg, old, 1, torch.float32, CPU, open_reader=lambda d: reader)
    assert reader.client.bytes == start and same(first, again)
    # A fresh process on the same agent: the same cache, a new reader.
    _, later = agent_reader(server, sharded)
    assert later.wants(sharding.reads(cfg, old, 1, "fp32", set(later.manifest.tensors))) == []
    moved = load_shard(local, cfg, new, 1, torch.float32, CPU, open_reader=lambda d: later)
    assert same(moved, load_shard(sharded, cfg, new, 1, torch.float32, CPU))
    gained = slice_bytes(cfg, new, 1, later.manifest) - slice_bytes(cfg, old, 1, later.manifest)
    assert later.client.bytes == gained > 0


def test_a_damaged_chunk_is_fetched_again_never_used(sharded, server, cache_dir):
    cfg = ModelConfig.from_hf(load_hf_config(sharded))
    plan = make_plan(cfg, [1, 1])
    local, reader = agent_reader(server, sharded)
    load_shard(local, cfg, plan, 0, torch.float32, CPU, open_reader=lambda d: reader)
    name = "model.layers.1.self_attn.q_proj.weight"
    chunk = reader.cache.chunks(reader.model, name, "raw", 0)[0]
    path = reader.cache.path(chunk.sha256)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    before = reader.client.bytes
    again = load_shard(local, cfg, plan, 0, torch.float32, CPU, open_reader=lambda d: reader)
    assert same(again, load_shard(sharded, cfg, plan, 0, torch.float32, CPU))
    assert reader.client.bytes - before == len(data)  # that chunk, and nothing else
    assert path.read_bytes() != bytes(data)


def test_a_fetch_cut_half_way_resumes_where_it_stopped(sharded, server, monkeypatch):
    cfg = ModelConfig.from_hf(load_hf_config(sharded))
    plan = make_plan(cfg, [1])
    monkeypatch.setattr(model_cache, "CHUNK_BYTES", 16 << 10)  # many chunks
    monkeypatch.setattr(model_cache, "COLUMN_CHUNK_BYTES", 16 << 10)
    local, reader = agent_reader(server, sharded)
    wants = reader.wants(sharding.reads(cfg, plan, 0, "fp32", set(reader.manifest.tensors)))
    total = sum(w.nbytes for w in wants)
    assert len(wants) > 20

    class Cut(Exception): ...

    def cut(nbytes, seen=[0]):
        seen[0] += nbytes
        if seen[0] > total // 2:
            raise Cut()

    with pytest.raises(Cut):
        reader.fetch(wants, progress=cut)
    done = reader.client.bytes
    assert 0 < done < total
    _, resumed = agent_reader(server, sharded)
    rest = resumed.wants(sharding.reads(cfg, plan, 0, "fp32", set(resumed.manifest.tensors)))
    assert sum(w.nbytes for w in rest) <= total - done + model_cache.IN_FLIGHT * (16 << 10)
    resumed.fetch(rest)
    assert resumed.client.bytes + done <= total + model_cache.IN_FLIGHT * (16 << 10)
    loaded = load_shard(local, cfg, plan, 0, torch.float32, CPU, open_reader=lambda d: resumed)
    assert same(loaded, load_shard(sharded, cfg, plan, 0, torch.float32, CPU))


def test_the_cache_keeps_to_its_bound_least_recently_used_out_first(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=3000)
    chunks = [cache.put("m", f"t{i}", "raw", 0, 0, 10, bytes([i]) * 1000) for i in range(3)]
    cache.read(chunks[0])  # used again: newest
    cache.put("m", "t3", "raw", 0, 0, 10, b"x" * 1000)
    assert cache.evict() == 1000 and cache.total_bytes() == 3000
    assert cache.chunks("m", "t1", "raw", 0) == [] and cache.chunks("m", "t0", "raw", 0) == [chunks[0]]
    assert not cache.path(chunks[1].sha256).exists()


def test_cover_splits_a_range_into_held_chunks_and_gaps():
    C = model_cache.Chunk
    chunks = [C(0, 4, "a"), C(2, 8, "b"), C(12, 16, "c")]
    assert cover(1, 14, chunks) == [(1, 4, chunks[0]), (4, 8, chunks[1]), (8, 12, None), (12, 14, chunks[2])]
    assert cover(20, 22, chunks) == [(20, 22, None)]


def test_slices_go_only_to_signed_requests_and_bad_asks_get_a_4xx(sharded, server):
    source = server.offer(sharded)
    base = f"http://127.0.0.1:{source.port}/v1/models/{source.model_id}"
    ask = {"tensor": "model.norm.weight", "kind": "raw"}
    unsigned = httpx.post(base + "/slice", json=ask)
    assert unsigned.status_code == 401 and b"\x00" not in unsigned.content and len(unsigned.content) < 200
    path = f"/v1/models/{source.model_id}/slice"
    body = b'{"tensor": "model.norm.weight", "kind": "raw"}'
    wrong = signed_headers("t" * 64, "POST", path, source.receiver, body)
    assert httpx.post(base + "/slice", content=body, headers=wrong).status_code == 401
    assert httpx.get(base + "/files/config.json").status_code == 401

    client = HostClient(source, SECRET)
    assert len(client.call("POST", path, ask)) == 64 * 4  # signed: the final norm, 64 float32s
    for bad, code in [({"tensor": "nope"}, 404), ({"tensor": "model.norm.weight", "dim": 0, "start": 5, "stop": 99},
                      400), ({"tensor": "model.norm.weight", "dim": 1, "start": 0, "stop": 1}, 400),
                      ({"tensor": "model.norm.weight", "extra": 1}, 400), ({"tensor": "model.norm.weight", "kind": "x"},
                      400)]:
        with pytest.raises(ModelUnavailable, match=str(code)):
            client.call("POST", path, bad)
    with pytest.raises(ModelUnavailable, match="404"):
        client.call("GET", f"/v1/models/{'0' * 32}/manifest")
    with pytest.raises(ModelUnavailable, match="404"):
        client.call("GET", f"/v1/models/{source.model_id}/files/..%2Fpool.secret")
    assert MAX_SLICE_BYTES >= max(model_cache.CHUNK_BYTES, model_cache.COLUMN_CHUNK_BYTES)


def test_the_cluster_tab_says_what_each_agent_fetched():
    from llmd.app.host import Fetch
    from llmd.ui import fns

    peers = [{"name": n, "address": "198.18.0.2", "port": 1, "devices": "cpu", "free_mb": 1, "health": "ok",
              "joined": True, "fetch": f} for n, f in [
                  ("busy", Fetch("http://198.18.0.2:1", 12_300_000, 40_000_000, 5_000_000, 5.5)),
                  ("done", Fetch("http://198.18.0.3:1", 40_000_000, 40_000_000, 9_000_000, 0.0)),
                  ("had", Fetch("http://198.18.0.4:1", 0, 0, 0, None)), ("local", None)]]
    frame = fns.peers_frame(peers)
    assert list(frame["model slices"]) == ["12.3 of 40.0 MB, 5.0 MB/s, 6 s left", "fetched 40.0 MB", "had them all", ""]


def test_a_share_larger_than_the_cache_bound_still_loads_and_grows(sharded, server):
    """The bound gives way to what a rank is loading: nothing it needs is evicted under it, and the cache is
    back within the bound as soon as it no longer needs more."""
    cfg = ModelConfig.from_hf(load_hf_config(sharded))
    old, new = make_plan(cfg, [1, 1]), make_plan(cfg, [3, 1])  # rank 0 grows
    local, reader = agent_reader(server, sharded)
    bound = slice_bytes(cfg, old, 0, reader.manifest) // 2
    for plan in (old, new):
        _, r = agent_reader(server, sharded, max_bytes=bound)
        fetch_for(r, [0], plan, "fp32", "test")
        got = load_shard(local, cfg, plan, 0, torch.float32, CPU, open_reader=lambda d: r)
        assert same(got, load_shard(sharded, cfg, plan, 0, torch.float32, CPU))
        for t in got.tensors():  # copied out of the chunks: no view keeps a chunk's buffer alive
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    _, other = agent_reader(server, sharded, max_bytes=bound)
    fetch_for(other, [1], new, "fp32", "test")  # another rank's fetch evicts what rank 0 no longer loads
    assert other.cache.total_bytes() <= max(bound, slice_bytes(cfg, new, 1, other.manifest))


def test_odd_tensors_get_a_4xx_and_the_server_closes_its_files(tmp_path, cache_dir):
    from safetensors.torch import save_file

    model = tmp_path / "odd"
    model.mkdir()
    save_file({"scalar": torch.tensor(1.0), "empty": torch.zeros(0, 4), "w": torch.ones(4, 4)},
              model / "model.safetensors")
    (model / "config.json").write_text("{}")

    def open_files() -> int:
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if "odd" in str(fd.resolve(strict=False)))

    s = ModelServer("127.0.0.1", SECRET)
    try:
        source = s.offer(model)
        client = HostClient(source, SECRET)
        path = f"/v1/models/{source.model_id}/slice"
        for ask in [{"tensor": "scalar"}, {"tensor": "empty"}, {"tensor": "scalar", "kind": "bf16"},
                    {"tensor": "empty", "kind": "int8", "dim": 0, "start": 0, "stop": 1}]:
            with pytest.raises(ModelUnavailable, match="400"):
                client.call("POST", path, ask)
        assert len(client.call("POST", path, {"tensor": "w", "kind": "int8", "dim": 1, "start": 0, "stop": 2})) == 8 + 8
        assert open_files() > 0
    finally:
        s.close()
    assert open_files() == 0


def test_a_partial_chunk_left_by_a_killed_writer_is_swept(tmp_path):
    ChunkCache(tmp_path)
    stale, fresh = tmp_path / "chunks" / ".part-dead", tmp_path / "chunks" / ".part-live"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    os.utime(stale, (time.time() - model_cache.STALE_PART_S - 60,) * 2)
    ChunkCache(tmp_path)  # a new process opening the cache
    assert not stale.exists() and fresh.exists()
