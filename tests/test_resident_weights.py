"""Each rank keeps only its slice of the weights resident, never the whole model.

Runs the real CLI, then checks the `weights_mb_per_rank` it reports against the
bytes the plan says each rank should hold, computed here from the model's shape.
"""

import pytest

from conftest import llmd
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.memory import shard_weight_bytes
from llmd.engine.plan import Plan

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


@pytest.mark.parametrize("workers,shares", [("2", "2,1"), ("3", None)])
def test_each_rank_holds_only_its_slice(cfg, workers, shares):
    args = ["generate", "--workers", workers, "--json", "--max-new-tokens", "2", "--greedy", "Hello"]
    if shares:
        args += ["--shares", shares]
    out = llmd(*args, timeout=180).json
    plan, reported = out["plan"], out["weights_mb_per_rank"]
    assert len(reported) == len(plan["ranks"]) == int(workers)

    whole_mb = expected_bytes(cfg, whole_model_rank(cfg)) / MIB
    for rank, mb in zip(plan["ranks"], reported):
        assert mb == pytest.approx(expected_bytes(cfg, rank) / MIB, abs=0.1), f"rank {rank['rank']}"
        # Its share of the model, give or take the replicated norms: 2/3 or 1/3 of it, not all.
        fraction = plan["shares"][rank["rank"]] / sum(plan["shares"])
        assert mb < whole_mb * fraction + 1, f"rank {rank['rank']} holds {mb} MB of a {whole_mb:.0f} MB model"


def whole_model_rank(cfg: ModelConfig) -> dict:
    """One rank holding everything, in the plan JSON's form."""
    return {"q_heads": list(range(cfg.num_heads)), "kv_groups": list(range(cfg.num_kv_heads)),
            "mlp_columns": [0, cfg.intermediate_size], "vocab_rows": [0, cfg.vocab_size]}


def test_pipeline_stages_hold_only_their_layers(cfg):
    """3 workers in 2 stages: the planner's memory arithmetic (engine/memory.py) is what each rank holds."""
    out = llmd("generate", "--workers", "3", "--stages", "2", "--json", "--max-new-tokens", "2", "--greedy", "Hello",
               timeout=180).json
    plan = Plan.from_dict(out["plan"])
    for rank, mb in enumerate(out["weights_mb_per_rank"]):
        assert mb == pytest.approx(shard_weight_bytes(cfg, plan, rank) / MIB, abs=0.1), f"rank {rank}"
    whole_mb = expected_bytes(cfg, whole_model_rank(cfg)) / MIB
    assert sum(out["weights_mb_per_rank"]) < whole_mb * 1.3  # layers are not repeated across stages
