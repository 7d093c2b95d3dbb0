"""The unsharded transformers model, as the reference every engine test compares with."""

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=4)
def hf_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def teacher_forced_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Logits [S, V] at every position of one sequence."""
    return hf_model(model_dir)(torch.tensor([token_ids])).logits[0]


@torch.inference_mode()
def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(model_dir)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
