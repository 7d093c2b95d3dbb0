"""How much memory a rank's shard needs, from the plan alone (no weights read).

A rank holds only its stage's layers; the embedding rows live on the first stage,
the LM-head rows and the final norm on the last (a tied embedding is one tensor
when both are the same stage and dense, and read twice, once per end, when they are
not). The sizes come from engine/sharding.py's table, the same one the loader reads;
linear layers cost what their precision holds (engine/quant.py), everything else
(norms, biases, the embedding) the activation dtype's bytes.
"""

import math

from . import quant, sharding
from .config import ModelConfig
from .plan import Plan, RankShard


def activation_bytes(weights: str) -> int:
    """The bytes of a value held in the activation dtype, as the CLI chooses it on CPU (engine/quant.py)."""
    return quant.DENSE_DTYPES.get(weights, quant.DENSE_DTYPES["fp32"]).itemsize


def layer_bytes(cfg: ModelConfig, shard: RankShard, weights: str = "fp32", act_bytes: int | None = None) -> int:
    """One layer on this rank: every field of the table, with its bias where the model has one."""
    act = act_bytes or activation_bytes(weights)
    group = quant.group_size(cfg) if weights == "int4" else 1
    total = 0
    for f in sharding.LAYER:
        rows, *cols = sharding.field_shape(cfg, f.weight, shard)
        if f.linear:
            total += quant.weight_bytes(weights, rows, cols[0], group) if weights in quant.QUANTISED else \
                rows * cols[0] * act
        else:
            total += rows * act
        if f.has_bias(cfg):
            total += math.prod(sharding.field_shape(cfg, f.bias, shard)) * act
    return total


def ends_bytes(cfg: ModelConfig, shard: RankShard, first: bool, last: bool, weights: str = "fp32",
               act_bytes: int | None = None) -> int:
    act = act_bytes or activation_bytes(weights)
    rows, H = sharding.shape(cfg, sharding.EMBED, shard)
    total = rows * H * act if first else 0
    if last:
        if weights in quant.QUANTISED:  # int8 for int4 weights too (engine/model.py Maker.rows_linear)
            total += quant.weight_bytes("int8", rows, H)
        elif not (cfg.tie_word_embeddings and first):
            total += rows * H * act
        total += H * act  # the final norm
    return total


def shard_weight_bytes(cfg: ModelConfig, plan: Plan, rank: int, weights: str = "fp32",
                       act_bytes: int | None = None) -> int:
    shard, stage = plan.ranks[rank], plan.stage_of(rank)
    first, last = shard.stage == 0, shard.stage == len(plan.stages) - 1
    layers = stage.layers[1] - stage.layers[0]
    return layers * layer_bytes(cfg, shard, weights, act_bytes) + ends_bytes(cfg, shard, first, last, weights, act_bytes)


def kv_cache_bytes(cfg: ModelConfig, plan: Plan, rank: int, context: int, slots: int,
                   bytes_per_value: int = 4) -> int:
    stage = plan.stage_of(rank)
    layers = stage.layers[1] - stage.layers[0]
    return 2 * layers * slots * len(plan.ranks[rank].kv_heads) * context * cfg.head_dim * bytes_per_value


def rank_bytes(cfg: ModelConfig, plan: Plan, rank: int, context: int, slots: int, weights: str = "fp32",
               act_bytes: int | None = None) -> int:
    act = act_bytes or activation_bytes(weights)
    return shard_weight_bytes(cfg, plan, rank, weights, act) + kv_cache_bytes(cfg, plan, rank, context, slots, act)


MAX_DEFAULT_SLOTS = 8


def default_slots(cfg: ModelConfig, plan: Plan, context: int, weights: str, act_bytes: int,
                  free_bytes: list[int]) -> int:
    """KV slots (sequences decoded at once) when none are asked for: up to MAX_DEFAULT_SLOTS, as many as
    every rank's device holds beside its weights in half its free memory (`free_bytes` per rank)."""
    fits = MAX_DEFAULT_SLOTS
    for rank, free in enumerate(free_bytes):
        room = free // 2 - shard_weight_bytes(cfg, plan, rank, weights, act_bytes)
        per_slot = max(kv_cache_bytes(cfg, plan, rank, context, 1, act_bytes), 1)
        fits = min(fits, room // per_slot)
    return max(int(fits), 1)
