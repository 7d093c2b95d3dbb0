"""Weight-only quantisation of a rank's slices, one tensor at a time, as they are loaded.

int8: symmetric, one scale per output channel (row), computed over the whole row even when a
rank holds only some of its columns, so a rank's slice is exactly that slice of the whole
quantised tensor. int4: asymmetric groups of `GROUP` values along the input dimension, a
scale and a zero per group (as gpt-fast does); groups never straddle a shard boundary (the
planner splits MLP columns in whole groups, and a head is whole groups), so again a rank's
slice equals the same slice of the whole quantised tensor.
"""

from functools import cache
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UnsupportedModel

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
QUANTISED = ("int8", "int4")
DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GROUP_SIZES = (32, 64)  # int4 group sizes tried, best first (bench/quant.py measures both)


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
    """MLP columns go to ranks in whole int4 groups, so a group never straddles two ranks. int8 rows keep
    whole-row scales: any column will do."""
    return group_size(cfg) if weights == "int4" else 1


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row scales of whole [out, in] rows: [out] bfloat16 (the kernels take them so)."""
    return (w.float().abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)


def quantise_int8(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[out, in] -> int8 values with the given per-row scales (those of the whole rows)."""
    return (w.float() / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)


def quantise_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] -> (values q in 0..15 as uint8 [out, in], scales [out, in / group], zeros; bfloat16).

    w ~ (q - 8) * scale + zero. q is computed from the bfloat16-rounded scale and zero, the ones
    dequantisation uses. Packing two values a byte is the linear layer's (engine/layers.py)."""
    out, inp = w.shape
    groups = w.float().reshape(out, inp // group, group)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = ((groups - (z - 8 * s)) / s).round().clamp(0, 15).to(torch.uint8).reshape(out, inp)
    return q, scales, zeros


def quantise(w: torch.Tensor, weights: str, group: int | None = None) -> tuple[torch.Tensor, ...]:
    """A slice [out, in] of whole rows in this precision: int8 (values, scales), int4 (values, scales, zeros)."""
    if weights == "int8":
        scales = int8_scales(w)
        return quantise_int8(w, scales), scales
    return quantise_int4(w, group)


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] (uint8, 0..15) -> [out, in / 2], inputs 2j and 2j + 1 in byte j: how slices travel."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_pairs(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def pack_nibbles(q: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 values [out, in] -> [out, in / 2]: in each group, byte j holds value j (low) and j + group/2
    (high), a layout the compiler unpacks with two shifts instead of a gather."""
    out, inp = q.shape
    g = q.reshape(out, inp // group, 2, group // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(out, inp // 2)


def dequantise_int4(packed, scales, zeros, dtype) -> torch.Tensor:
    """`pack_nibbles` layout back to [out, in] weights in `dtype`."""
    out, groups = scales.shape
    p = packed.reshape(out, groups, -1)
    q = torch.cat([p & 15, p >> 4], dim=-1).to(dtype)  # [out, groups, group]
    return ((q - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).reshape(out, -1)


def weight_bytes(weights: str, rows: int, cols: int, group: int = 32) -> int:
    """Bytes of one [rows, cols] linear weight held in this precision, its scales and zeros included."""
    if weights == "int8":
        return rows * cols + 2 * rows  # int8 values, a bfloat16 scale per row
    if weights == "int4":  # nibbles (rows padded to 16 for the CPU kernel), a bfloat16 scale and zero per group
        return padded_rows(rows) * (cols // 2 + 2 * 2 * (cols // group))
    return rows * cols * DENSE_DTYPES[weights].itemsize


def padded_rows(rows: int) -> int:
    """The CPU int4 kernel packs rows in blocks of 16: a layer's rows are padded to a multiple of 16."""
    return -(-rows // 16) * 16


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX): then torch's packed int4
    kernel on bfloat16 activations runs 2-4x fp32 (bench/linear_kernels.py); without, it is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def kernel_form(device: str, split_inputs: bool = False) -> str:
    """How an int4 layer computes on this device. On CUDA, "cuda-bf16": torch's tinygemm kernel on the
    bfloat16 activations. On CPU, "cpu-bf16": torch's packed CPU kernel on bfloat16 activations, where
    the CPU has bfloat16 instructions, else "dequant", a dequantising multiply-sum in the activation
    dtype (compiled on the decode path). A layer split by its inputs (o_proj, down_proj) always
    dequantises on CPU: each rank holds a partial sum of it, and the kernel would round that to
    bfloat16, where 2 ranks would round two halves that 1 rank rounds whole; summed in float32, N ranks
    compute what 1 rank computes up to the order of the all-reduce. (On CUDA every partial sum is
    bfloat16 already, as with dense bf16 weights.) int8 always dequantises: compiled, that is as fast
    as torch's packed int8 kernel."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "cuda-bf16"
    if split_inputs or kind != "cpu" or not cpu_has_bf16():
        return "dequant"
    return "cpu-bf16"


def inner_k_tiles(inputs: int) -> int:
    """The CUDA int4 layout's tiling of the inputs: the largest of 8, 4, 2 whose 16-input tiles divide them
    (a layer's inputs are whole groups of 32, so 2 always does)."""
    return next(t for t in (8, 4, 2) if inputs % (16 * t) == 0)


def activation_dtype(weights: str, device: str) -> torch.dtype:
    """The dtype of activations, the KV cache and everything not quantised. Around quantised weights on
    CPU it stays float32: the compiled decode step streams the small weights and sums in float32, and
    ranks add float32 partial sums, so N ranks compute what 1 rank computes. On CUDA, bfloat16."""
    if weights in DENSE_DTYPES:
        return DENSE_DTYPES[weights]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
