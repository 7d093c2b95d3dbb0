"""Shape-only model presets and device kinds for the planner: no weights, no hub, no GPU needed.

A preset is a plain `ModelConfig` (as gpt-fast's `ModelArgs.from_name`), so the planner can answer
"does Llama-3.1-70B fit on four RTX 4090s?" before anything is downloaded.
"""

from dataclasses import dataclass

from .config import ModelConfig
from .errors import BadPlan, LlmdError


class UnknownPreset(LlmdError): ...


class UnknownDeviceKind(BadPlan): ...  # a BadPlan: an unknown kind is malformed planner input


def _llama_shape(
    vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, *,
    model_type: str = "llama", tied: bool = False, qkv_bias: bool = False, max_positions: int = 131072,
    eps: float = 1e-5,
) -> ModelConfig:
    return ModelConfig(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, rms_norm_eps=eps,
        max_positions=max_positions, qkv_bias=qkv_bias, o_bias=False, mlp_bias=False,
        tie_word_embeddings=tied, sliding_window=None,
    )


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": _llama_shape(49152, 576, 1536, 30, 9, 3, 64, tied=True, max_positions=8192),
    "llama-3.1-8b": _llama_shape(128256, 4096, 14336, 32, 32, 8, 128),
    "llama-3.1-70b": _llama_shape(128256, 8192, 28672, 80, 64, 8, 128),
    "mistral-7b": _llama_shape(32000, 4096, 14336, 32, 32, 8, 128, model_type="mistral", max_positions=32768),
    "qwen2-7b": _llama_shape(
        152064, 3584, 18944, 28, 28, 4, 128, model_type="qwen2", qkv_bias=True, max_positions=32768, eps=1e-6
    ),
    # intermediate_size is per expert; MOE below says how many experts exist and how many run per token.
    "mixtral-8x22b": _llama_shape(32768, 6144, 16384, 56, 48, 8, 128, model_type="mixtral", max_positions=65536),
}


@dataclass(frozen=True)
class MoE:
    num_experts: int  # all of them sit in memory
    active_experts: int  # only these are read for one token


DENSE = MoE(num_experts=1, active_experts=1)

MOE: dict[str, MoE] = {"mixtral-8x22b": MoE(num_experts=8, active_experts=2)}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPreset(f"no model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def moe_of(cfg: ModelConfig) -> MoE:
    """Expert counts of a config, matched against the MoE presets by shape; dense models get DENSE."""
    for name, moe in MOE.items():
        if PRESETS[name] == cfg:
            return moe
    return DENSE


@dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_gb: float
    bandwidth_gb_s: float
    tflops: float  # dense bf16 (or fp32 for cpu), what prefill can use


DEVICE_KINDS: dict[str, DeviceKind] = {
    k.name: k
    for k in (
        DeviceKind("rtx4090", 24, 1008, 165),
        DeviceKind("rtx3090", 24, 936, 71),
        DeviceKind("a100-80gb", 80, 2039, 312),
        DeviceKind("h100", 80, 3350, 990),
        DeviceKind("cpu", 32, 30, 1),
    )
}


def device_kind(name: str) -> DeviceKind:
    try:
        return DEVICE_KINDS[name]
    except KeyError:
        raise UnknownDeviceKind(
            f"unknown device kind {name!r}; known kinds: {', '.join(sorted(DEVICE_KINDS))}"
        ) from None
