"""Linear layers with one call signature, y = linear(x), whatever form holds the weights.

The model's math calls a linear layer and never looks at its weights, so the same blocks run
dense or quantised weights, eager or compiled.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import quant


@dataclass(frozen=True)
class Dense:
    """Weights as they are: [out, in], in the activation dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T + bias.

        Compiled, one row per sequence (decode) becomes a fused multiply-sum that streams the
        weights at memory speed, where the BLAS matrix-vector path on CPU reaches about a third
        of it (bench/decode.py). Eager, the same expression would materialise weight-sized temporaries.
        """
        if x.shape[-2] == 1 and torch.compiler.is_compiling():
            y = (self.weight * x.unsqueeze(-2)).sum(-1)  # [..., 1, out]
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        """Let a compiled caller treat the weight's sharded dimension (0 out, 1 in) as symbolic, so the
        balancer's moves reuse the same code. A dimension of size 1 cannot be: the compiler specialises it."""
        for t, d in ((self.weight, dim), (self.bias, 0)):
            if t is not None and (t is self.weight or dim == 0) and t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """[..., in] -> [rows, in] contiguous bfloat16, as torch's packed CPU kernels take activations."""
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


DEQUANT_ROWS = 4096  # rows of a layer dequantised at once outside the compiled decode step


def by_row_blocks(x: torch.Tensor, rows: int, weights) -> torch.Tensor:
    """x @ W.T with W [rows, in] dequantised `DEQUANT_ROWS` rows at a time by `weights(start, end)`, so a
    large layer (the LM head) never exists whole in float32 outside the compiled decode step."""
    return torch.cat([F.linear(x, weights(a, min(a + DEQUANT_ROWS, rows))) for a in range(0, rows, DEQUANT_ROWS)],
                     dim=-1)


@dataclass(frozen=True)
class Int8:
    """int8 weights [out, in] with a bfloat16 scale per output row (engine/quant.py), dequantised in a
    multiply-sum in the activation dtype. Compiled, one row per sequence reads each weight once, at a
    byte, and sums in float32 on CPU; that runs as fast as torch's packed int8 kernel on bfloat16
    activations (bench/linear_kernels.py), and the ranks' partial sums stay float32, so N ranks compute what
    one rank computes up to the order of the all-reduce."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 1 and torch.compiler.is_compiling():
            y = (self.weight.to(x.dtype) * x.unsqueeze(-2)).sum(-1)
        else:
            y = by_row_blocks(x, self.weight.shape[0], lambda a, b: self.weight[a:b].to(x.dtype))
        y = y * self.scales.to(x.dtype)  # the row scale applies after the sum
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scales, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        for t, d in ((self.weight, dim), (self.scales, 0), (self.bias, 0)):
            if t is not None and (t is self.weight or dim == 0) and t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)


@dataclass(frozen=True)
class Int4:
    """4-bit weights, two a byte, with a bfloat16 scale and zero per group of inputs; rows padded to a
    multiple of 16, the padding cut from the output. `form` "cpu-bf16" / "cuda-bf16": `packed` is torch's
    CPU / CUDA (tinygemm) int4 layout, multiplied by its kernel on bfloat16 activations; "dequant":
    `packed` is quant.pack_nibbles' layout, dequantised in a multiply-sum."""

    packed: torch.Tensor  # [out (padded), in / 2] uint8; on CUDA, the kernel's own int32 tiles of as many bytes
    scales_zeros: torch.Tensor  # [in / group, out (padded), 2] bfloat16, as the kernels take them
    rows: int
    group: int
    bias: torch.Tensor | None = None
    form: str = "dequant"

    @classmethod
    def build(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, form: str,
              bias: torch.Tensor | None = None) -> "Int4":
        """From quant.quantise_int4's values [out, in] and per-group scales and zeros [out, in / group]."""
        rows, pad = q.shape[0], quant.padded_rows(q.shape[0]) - q.shape[0]
        q, scales, zeros = (F.pad(t, (0, 0, 0, pad)) for t in (q, scales, zeros))
        if form == "cpu-bf16":
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        elif form == "cuda-bf16":  # two values a byte, the even input in the high nibble, as tinygemm takes them
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack(pairs, quant.inner_k_tiles(q.shape[1]))
        else:
            packed = quant.pack_nibbles(q, group)
        scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scales_zeros, rows, group, bias, form)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.form != "dequant":
            y = self.kernel(rows_of(x)).view(*x.shape[:-1], -1).to(x.dtype)
        elif x.shape[-2] == 1 and torch.compiler.is_compiling():
            y = self.multiply_sum(x)
        else:
            y = by_row_blocks(x, self.packed.shape[0], lambda a, b: self.dequantised(x.dtype, a, b))
        y = y[..., : self.rows]
        return y if self.bias is None else y + self.bias

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's kernel for this form: bfloat16 rows [M, in] -> [M, out (padded)] in bfloat16."""
        if self.form == "cuda-bf16":
            return torch._weight_int4pack_mm(rows, self.packed, self.group, self.scales_zeros)
        return torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_zeros)

    def multiply_sum(self, x: torch.Tensor) -> torch.Tensor:
        """One row per sequence, x [..., 1, in] -> [..., 1, out], for the compiler to fuse with the
        unpacking: each group's low and high nibbles meet their halves of x, without a concatenation
        (which the compiler does not vectorise: 3-20x slower, bench/linear_kernels.py)."""
        sz = self.scales_zeros.transpose(0, 1).to(x.dtype)  # [out, groups, 2]
        out, groups = sz.shape[:2]
        p = self.packed.view(out, groups, self.group // 2)
        xg = x.reshape(*x.shape[:-1], 1, groups, 2, self.group // 2)  # [..., 1, 1 (out), groups, 2, group / 2]
        scale, zero = sz[..., 0, None], sz[..., 1, None]
        low = ((p & 15).to(x.dtype) - 8) * scale + zero
        high = ((p >> 4).to(x.dtype) - 8) * scale + zero
        return (low * xg[..., 0, :] + high * xg[..., 1, :]).sum((-1, -2))

    def dequantised(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The weights [out (padded), in] in `dtype` (rows start:end). torch's layouts (CPU, CUDA) are read back
        through their own kernel (an identity input: each output is one weight, in bfloat16's rounding)."""
        if self.form != "dequant":
            inputs = self.scales_zeros.shape[0] * self.group
            eye = torch.eye(inputs, dtype=torch.bfloat16, device=self.packed.device)
            return self.kernel(eye)[:, start:end].T.to(dtype)
        sz = self.scales_zeros.transpose(0, 1)[start:end]  # [out, groups, 2]
        return quant.dequantise_int4(self.packed[start:end], sz[..., 0], sz[..., 1], dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scales_zeros, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        """Kept static: a move that changes this layer's shape recompiles it (int4 layouts are blocked)."""


Linear = Dense | Int8 | Int4


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
