"""How much memory a rank's shard needs, from the plan alone (no weights read).

A rank holds only its stage's layers; the embedding rows live on the first stage,
the LM-head rows and the final norm on the last (a tied embedding is one tensor
when both are the same stage, and read twice, once per end, when they are not).
"""

from .config import ModelConfig
from .plan import Plan


def shard_weight_bytes(cfg: ModelConfig, plan: Plan, rank: int, bytes_per_param: int = 4) -> int:
    shard, stage = plan.ranks[rank], plan.stage_of(rank)
    first, last = shard.stage == 0, shard.stage == len(plan.stages) - 1
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv, cols = len(shard.q_heads), len(shard.kv_heads), shard.num_mlp_columns
    per_layer = (q + 2 * kv) * D * H + H * q * D + 3 * cols * H + 2 * H  # qkv, o, gate/up/down, norms
    per_layer += ((q + 2 * kv) * D if cfg.qkv_bias else 0) + (H if cfg.o_bias else 0)
    per_layer += (2 * cols + H) if cfg.mlp_bias else 0
    rows = shard.num_vocab_rows * H
    embed = rows if first else 0
    head = (0 if cfg.tie_word_embeddings and first else rows) + H if last else 0  # + the final norm
    layers = stage.layers[1] - stage.layers[0]
    return (layers * per_layer + embed + head) * bytes_per_param


def kv_cache_bytes(cfg: ModelConfig, plan: Plan, rank: int, context: int, slots: int,
                   bytes_per_value: int = 4) -> int:
    stage = plan.stage_of(rank)
    layers = stage.layers[1] - stage.layers[0]
    return 2 * layers * slots * len(plan.ranks[rank].kv_heads) * context * cfg.head_dim * bytes_per_value


def rank_bytes(cfg: ModelConfig, plan: Plan, rank: int, context: int, slots: int) -> int:
    return shard_weight_bytes(cfg, plan, rank) + kv_cache_bytes(cfg, plan, rank, context, slots)
