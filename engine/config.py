"""The shape of a Llama-family model, read from a Hugging Face config."""

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from .errors import UnsupportedModel

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> "ModelConfig":
        if hf.model_type not in SUPPORTED_TYPES:
            raise UnsupportedModel(
                f"model type {hf.model_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {hf.hidden_act!r} is not supported (only silu)")
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) == "dynamic":
            raise UnsupportedModel("dynamic RoPE scaling is not supported")
        num_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        assert hf.num_attention_heads % num_kv == 0, "query heads must be a multiple of KV heads"
        is_qwen2 = hf.model_type == "qwen2"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        window = getattr(hf, "sliding_window", None)
        if is_qwen2 and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=num_kv,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_positions=hf.max_position_embeddings,
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            sliding_window=window,
        )


def load_hf_config(model_dir: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir)
