"""How much memory a rank's shard needs, from the plan alone (no weights read)."""

from .config import ModelConfig
from .plan import RankShard


def shard_weight_bytes(cfg: ModelConfig, shard: RankShard, bytes_per_param: int = 4) -> int:
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv, cols = len(shard.q_heads), len(shard.kv_heads), shard.num_mlp_columns
    per_layer = (q + 2 * kv) * D * H + H * q * D + 3 * cols * H + 2 * H  # qkv, o, gate/up/down, norms
    per_layer += ((q + 2 * kv) * D if cfg.qkv_bias else 0) + (H if cfg.o_bias else 0)
    per_layer += (2 * cols + H) if cfg.mlp_bias else 0
    vocab = shard.num_vocab_rows * H * (1 if cfg.tie_word_embeddings else 2)
    return (cfg.num_layers * per_layer + vocab + H) * bytes_per_param


def kv_cache_bytes(cfg: ModelConfig, shard: RankShard, context: int, slots: int, bytes_per_value: int = 4) -> int:
    return 2 * cfg.num_layers * slots * len(shard.kv_heads) * context * cfg.head_dim * bytes_per_value


def rank_bytes(cfg: ModelConfig, shard: RankShard, context: int, slots: int) -> int:
    return shard_weight_bytes(cfg, shard) + kv_cache_bytes(cfg, shard, context, slots)
