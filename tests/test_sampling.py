"""Sampling filters agree with transformers' own logits processors."""

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from llmd.engine.sampling import SamplingParams, sample, warp


def hf_warp(logits, seen, params):
    ids = seen[None]
    scores = logits[None].clone()
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k > 0:  # 0 means no top-k, as in generate()
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k,top_p,temperature,penalty", [(50, 0.9, 0.7, 1.0), (5, 1.0, 1.3, 1.2), (0, 0.5, 1.0, 1.1)])
def test_warp_matches_transformers(seed, top_k, top_p, temperature, penalty):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1000, generator=g) * 3
    seen = torch.randint(0, 1000, (20,), generator=g)
    params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature, repetition_penalty=penalty)
    ours, ref = warp(logits, params, seen), hf_warp(logits, seen, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite])


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = torch.tensor([1.0, 3.0, 2.9])
    assert sample(logits, SamplingParams(greedy=True), torch.tensor([], dtype=torch.long), None) == 1
    penalised = SamplingParams(greedy=True, repetition_penalty=1.5)
    assert sample(logits, penalised, torch.tensor([1]), None) == 2


def test_seeded_sampling_is_reproducible_and_stays_in_top_k():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(top_k=3, top_p=1.0, temperature=1.0, seed=7)
    top3 = set(torch.topk(logits, 3).indices.tolist())
    draws = [sample(logits, params, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(7))
             for _ in range(2)]
    assert draws[0] == draws[1] and draws[0] in top3
