"""Each rank keeps only its slice of the weights resident, never the whole model.

The bytes engine/memory.py says a rank holds, against its slices computed here from the model's
shape; test_engine_exact.py checks, on every run, that the `weights_mb_per_rank` the engine
reports are those bytes.
"""

import pytest

from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.memory import shard_weight_bytes
from llmd.engine.plan import make_pipeline_plan, make_plan

MIB = 2**20
FP32 = 4


def expected_bytes(cfg: ModelConfig, rank: dict) -> int:
    """fp32 bytes of one rank's slices, from its entry in the plan JSON."""
    H, D = cfg.hidden_size, cfg.head_dim
    nq, nkv = len(rank["q_heads"]), len(rank["kv_groups"])
    cols = rank["mlp_columns"][1] - rank["mlp_columns"][0]
    vocab = rank["vocab_rows"][1] - rank["vocab_rows"][0]
    per_layer = (
        (nq + 2 * nkv) * D * H  # q, k and v rows of its heads (KV heads replicated where shared)
        + H * nq * D  # o_proj columns of its query heads
        + 3 * cols * H  # gate and up rows, down columns of its MLP range
        + 2 * H  # input and post-attention norms, replicated
    )
    # Tied embeddings: the LM head is the same tensor as the embedding slice, counted once.
    return FP32 * (cfg.num_layers * per_layer + vocab * H + H)  # + the final norm


@pytest.fixture(scope="module")
def cfg(default_model_dir) -> ModelConfig:
    cfg = ModelConfig.from_hf(load_hf_config(default_model_dir))
    # The formula above leaves out biases and a separate LM head; the bundled model has neither.
    assert cfg.tie_word_embeddings and not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    return cfg


@pytest.mark.parametrize("shares", [[1, 1], [2, 1], [1, 1, 1]])
def test_the_memory_arithmetic_counts_each_ranks_slices(cfg, shares):
    """What engine/memory.py says a rank holds is its slices by the model's shape; every run in
    test_engine_exact.py checks that each rank holds what engine/memory.py says."""
    plan = make_plan(cfg, shares)
    whole_mb = expected_bytes(cfg, whole_model_rank(cfg)) / MIB
    for rank in plan.to_dict()["ranks"]:
        mb = shard_weight_bytes(cfg, plan, rank["rank"]) / MIB
        assert mb == pytest.approx(expected_bytes(cfg, rank) / MIB, abs=0.01), f"rank {rank['rank']}"
        # Its share of the model, give or take the replicated norms: not all of it.
        fraction = plan.shares[rank["rank"]] / sum(plan.shares)
        assert mb < whole_mb * fraction + 1, f"rank {rank['rank']} holds {mb} MB of a {whole_mb:.0f} MB model"


def whole_model_rank(cfg: ModelConfig) -> dict:
    """One rank holding everything, in the plan JSON's form."""
    return {"q_heads": list(range(cfg.num_heads)), "kv_groups": list(range(cfg.num_kv_heads)),
            "mlp_columns": [0, cfg.intermediate_size], "vocab_rows": [0, cfg.vocab_size]}


def test_pipeline_stages_hold_only_their_layers(cfg):
    """3 ranks in 2 stages: layers are not repeated across stages."""
    plan = make_pipeline_plan(cfg, [1, 1, 1], 2)
    whole_mb = expected_bytes(cfg, whole_model_rank(cfg)) / MIB
    total_mb = sum(shard_weight_bytes(cfg, plan, r) for r in range(plan.world_size)) / MIB
    assert total_mb < whole_mb * 1.3
    assert all(shard_weight_bytes(cfg, plan, r) < shard_weight_bytes(cfg, make_plan(cfg, [1]), 0) / 2
               for r in range(plan.world_size))
