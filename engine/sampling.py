"""Turning the driver's logits into the next token."""

import math
from dataclasses import dataclass, field

import torch

from .errors import BadSampling


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (0 <= self.temperature < math.inf, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0: no top-k)"),
            (0 < self.repetition_penalty < math.inf, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadSampling(message)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """As transformers does: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """Penalty, temperature, top-k and top-p, in transformers' order: logits [V] -> logits [V]."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator | None) -> int:
    """logits [V] -> one token id."""
    if params.greedy or params.temperature == 0:
        return int(torch.argmax(apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)))
    probs = warp(logits, params, seen).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
