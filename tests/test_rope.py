"""The engine's RoPE frequencies are transformers' own, bit for bit, for every rope type the model family uses."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llmd.engine.model import inverse_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


@pytest.mark.parametrize("config", [
    LlamaConfig(hidden_size=64, num_attention_heads=4),
    LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, rope_theta=500000.0),
    LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192, rope_scaling=LLAMA3),
    LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192,
                rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["default", "head-dim-and-theta", "llama3", "linear"])
def test_inverse_frequencies_equal_transformers(config):
    reference = LlamaRotaryEmbedding(config)
    inv_freq, scale = inverse_frequencies(config)
    assert torch.equal(inv_freq, reference.inv_freq) and scale == reference.attention_scaling
