"""Several sequences in one step: each batch row has its own KV slot and position."""

import pytest
import torch

from llmd.engine.comm import Solo
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import make_plan
from llmd.engine.worker import RankSpec, build_model, load_rank
from reference import teacher_forced_logits


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_decode_of_two_chats_matches_transformers(tiny_models, compiled):
    model_dir = tiny_models["qwen2-bias"]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    spec = RankSpec(model_dir=str(model_dir), plan=make_plan(cfg, [1.0]).to_dict(), rank=0, slots=3,
                    context=64, compile=compiled)
    model = build_model(spec, load_rank(spec), Solo())
    seqs = {2: [5, 17, 300, 41, 9], 0: [7, 8, 9, 10, 11, 12, 13, 14, 15]}  # slot -> prompt, different lengths
    for slot, ids in seqs.items():
        model.forward(torch.tensor([ids]), [slot], [0])
    steps = [[100, 200], [101, 201], [102, 202]]  # the next token of each chat, step by step
    slots = list(seqs)
    for step, tokens in enumerate(steps):
        starts = [len(seqs[s]) + step for s in slots]
        logits = model.forward(torch.tensor([[t] for t in tokens]), slots, starts)  # [2, V]
        for row, slot in enumerate(slots):
            history = seqs[slot] + [steps[i][row] for i in range(step + 1)]
            ref = teacher_forced_logits(model_dir, history)[-1]
            assert (logits[row] - ref).abs().max() < 1e-4


def test_clearing_a_slot_zeroes_its_cache_only(tiny_models):
    model_dir = tiny_models["llama-gqa"]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    spec = RankSpec(model_dir=str(model_dir), plan=make_plan(cfg, [1.0]).to_dict(), rank=0, slots=2, context=32)
    model = build_model(spec, load_rank(spec), Solo())
    model.forward(torch.tensor([[1, 2, 3]]), [0], [0])
    model.forward(torch.tensor([[4, 5, 6]]), [1], [0])
    model.clear_slot(0)
    assert all(not k[0].any() and not v[0].any() for k, v in zip(model.k_cache, model.v_cache))
    assert all(k[1].any() for k in model.k_cache)
