"""A balancer move builds each rank's new shard from the slices it holds, reading only what it gains."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmd.engine.checkpoint import SliceReader
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine import model
from llmd.engine.model import Maker, load_layer, load_shard
from llmd.engine.plan import make_plan
from llmd.engine.reslice import ReusingReader, held_by_layer, pieces

CPU = torch.device("cpu")


def load(model_dir: Path, plan, rank: int, reuse=None):
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    return load_shard(model_dir, cfg, plan, rank, torch.float32, CPU, reuse=reuse)


def test_pieces_split_a_range_into_held_and_missing_parts():
    have = [(10, 20), (0, 4)]  # stored in this order: rows 10..19 first, then 0..3
    assert pieces(2, 14, have) == [(2, 4, 12), (4, 10, None), (10, 14, 0)]
    assert pieces(20, 25, have) == [(20, 25, None)]
    assert pieces(12, 18, have) == [(12, 18, 2)]
    assert pieces(0, 4, []) == [(0, 4, None)]


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias", "mistral-2kv"])
@pytest.mark.parametrize("before, after", [([1, 1], [1, 3]), ([3, 1], [1, 1]), ([1, 1, 1], [2, 1, 3])])
def test_a_reused_shard_equals_a_fresh_read(tiny_models, kind, before, after):
    model_dir = tiny_models[kind]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    old, new = make_plan(cfg, before), make_plan(cfg, after)
    for rank in range(len(before)):
        held = load(model_dir, old, rank)
        fresh, reused = load(model_dir, new, rank), load(model_dir, new, rank, reuse=(old.ranks[rank], held))
        assert len(fresh.tensors()) == len(reused.tensors())
        for a, b in zip(fresh.tensors(), reused.tensors(), strict=True):
            assert a.shape == b.shape and torch.equal(a, b)


def test_a_paced_load_rests_after_each_layer_and_vocabulary_block(tiny_models, monkeypatch):
    monkeypatch.setattr(model, "VOCAB_BLOCK", 7)  # several blocks on a tiny vocabulary
    model_dir = tiny_models["llama-gqa"]  # untied: an embedding and an LM head, both paced
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    old, new = make_plan(cfg, [1, 1]), make_plan(cfg, [1, 3])
    for rank in range(2):
        held = load(model_dir, old, rank)
        rests = []
        paced = load_shard(model_dir, cfg, new, rank, torch.float32, CPU, rests.append, reuse=(old.ranks[rank], held))
        blocks = -(-new.ranks[rank].num_vocab_rows // 7)
        assert len(rests) == cfg.num_layers + 2 * blocks
        fresh = load(model_dir, new, rank)
        assert all(torch.equal(x, y) for x, y in zip(fresh.tensors(), paced.tensors(), strict=True))


def test_what_a_move_leaves_alone_is_shared_not_copied(tiny_models):
    model_dir = tiny_models["llama-gqa"]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    old = make_plan(cfg, [1, 1])
    a, b = old.ranks
    cut = a.mlp_columns[1] - 7  # 7 MLP columns move from rank 0 to rank 1, no head does
    new = replace(old, ranks=[replace(a, mlp_columns=(a.mlp_columns[0], cut)),
                              replace(b, mlp_columns=(cut, b.mlp_columns[1]))], epoch=1)
    held = load(model_dir, old, 1)
    reused = load(model_dir, new, 1, reuse=(old.ranks[1], held))
    for before, after in zip(held.layers, reused.layers, strict=True):
        assert after.q.weight is before.q.weight and after.o.weight is before.o.weight  # attention untouched: the same tensors
        assert after.down.weight.shape[1] == before.down.weight.shape[1] + 7
        assert after.down.weight.data_ptr() != before.down.weight.data_ptr()  # the old shard stays intact until the switch
    assert all(torch.equal(x, y) for x, y in zip(load(model_dir, new, 1).tensors(), reused.tensors(), strict=True))


def test_only_gained_slices_are_read(tiny_models):
    model_dir = tiny_models["llama-gqa"]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    old, new = make_plan(cfg, [1, 1]), make_plan(cfg, [1, 3])  # rank 0 gives heads and columns to rank 1
    H = cfg.hidden_size

    def layer_bytes(shard) -> int:
        q, kv, cols = len(shard.q_heads) * cfg.head_dim, len(shard.kv_heads) * cfg.head_dim, shard.num_mlp_columns
        return 4 * H * (2 * q + 2 * kv + 3 * cols)

    for rank, expected in ((0, 0), (1, layer_bytes(new.ranks[1]) - layer_bytes(old.ranks[1]))):
        held = load(model_dir, old, rank)
        with SliceReader(model_dir) as r:
            reader = ReusingReader(r, held_by_layer(cfg, old.ranks[rank], held.layers[0], 0))
            load_layer(reader, cfg, new.ranks[rank], 0, Maker(cfg, new.ranks[rank], "fp32", torch.float32, torch.device("cpu")))
        assert reader.bytes_read == expected
    assert layer_bytes(new.ranks[1]) > layer_bytes(old.ranks[1])  # the move did give rank 1 something
