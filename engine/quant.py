"""Weight-only quantisation of a rank's slices, one tensor at a time, as they are loaded.

int8: symmetric, one scale per output channel (row), computed over the whole row even when a
rank holds only some of its columns, so a rank's slice is exactly that slice of the whole
quantised tensor. int4: asymmetric groups of `GROUP` values along the input dimension, a
scale and a zero per group (as gpt-fast does); groups never straddle a shard boundary (the
planner splits MLP columns in whole groups, and a head is whole groups), so again a rank's
slice equals the same slice of the whole quantised tensor.
"""

import torch

from .config import ModelConfig
from .errors import UnsupportedModel

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
QUANTISED = ("int8", "int4")
DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GROUP_SIZES = (64, 32)  # int4 group sizes tried, best first (bench/kernels.py: 64 measured fastest)


def group_size(cfg: ModelConfig) -> int:
    """The int4 group size for this model: the largest that divides every dimension a shard is cut along
    the input side (hidden size, a head, the MLP columns)."""
    for g in GROUP_SIZES:
        if all(n % g == 0 for n in (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size)):
            return g
    raise UnsupportedModel(f"int4 weights need the hidden size ({cfg.hidden_size}), head size ({cfg.head_dim}) "
                           f"and MLP size ({cfg.intermediate_size}) divisible by {GROUP_SIZES[-1]}; "
                           "use --weights int8")


def column_unit(cfg: ModelConfig, weights: str) -> int:
    """MLP columns come in whole int4 groups, so a group never straddles two ranks."""
    return group_size(cfg) if weights == "int4" else 1


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row scales of a whole [out, in] tensor: [out] float32."""
    return (w.float().abs().amax(dim=1) / 127).clamp(min=1e-10)


def quantise_int8(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[out, in] -> int8 values with the given per-row scales (those of the whole rows)."""
    return (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


def quantise_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] -> (packed uint8 [out, in / 2], scales [out, in / group] and zeros, both bfloat16).

    w ~ (q - 8) * scale + zero, q in 0..15; two values a byte, the even input index in the low nibble.
    q is computed from the bfloat16-rounded scale and zero, the ones dequantisation uses."""
    out, inp = w.shape
    groups = w.float().reshape(out, inp // group, group)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = ((groups - (z - 8 * s)) / s).round().clamp(0, 15).to(torch.uint8).reshape(out, inp)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> the 4-bit values, [out, in] (as uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantise_int4(packed, scales, zeros, dtype) -> torch.Tensor:
    out = packed.shape[0]
    q = unpack_int4(packed).reshape(out, scales.shape[1], -1).to(dtype)
    return ((q - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).reshape(out, -1)


def weight_bytes(weights: str, rows: int, cols: int, group: int = 32) -> int:
    """Bytes of one [rows, cols] linear weight held in this precision, its scales and zeros included."""
    if weights == "int8":
        return rows * cols + 4 * rows  # int8 values, a float32 scale per row
    if weights == "int4":
        return rows * cols // 2 + 2 * 2 * rows * (cols // group)  # nibbles, a bfloat16 scale and zero per group
    return rows * cols * DENSE_DTYPES[weights].itemsize


def bytes_per_param(weights: str, group: int = 32) -> float:
    """What the planner charges a weight in this precision, scales included (a large square weight)."""
    n = 4096
    return weight_bytes(weights, n, n, group) / (n * n)


def activation_dtype(weights: str, device: str) -> torch.dtype:
    """The dtype of activations, the KV cache and everything not quantised. Around quantised weights on
    CPU it stays float32: the compiled decode step streams the small weights and sums in float32, and
    ranks add float32 partial sums, so N ranks compute what 1 rank computes. On CUDA, bfloat16."""
    if weights in DENSE_DTYPES:
        return DENSE_DTYPES[weights]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
