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


def chunked(kernel, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """One row x [..., 1, in] through a bfloat16 kernel, its input cut in chunks whose outputs are summed
    in float32: [..., 1, out].

    A layer split by its inputs (o_proj by heads, down_proj by MLP columns) gives each rank a partial
    sum, and a bfloat16 kernel rounds it: 2 ranks would round two halves where 1 rank rounds the whole.
    Chunks that never straddle two ranks (a head, a block of columns) are rounded alike on every rank,
    and only their float32 sum is added in another order, as with dense weights. The chunks go through
    one kernel call as the rows of a block-diagonal matrix (row c holds chunk c, zeros elsewhere):
    decode reads the weights once either way."""
    inputs = x.shape[-1]
    c = inputs // chunk
    diag = torch.eye(c, dtype=torch.bfloat16, device=x.device)[:, :, None]
    rows = (diag * x.reshape(-1, 1, c, chunk).to(torch.bfloat16)).reshape(-1, c, inputs)  # [B, c, in]
    y = kernel(rows.reshape(-1, inputs).contiguous()).view(rows.shape[0], c, -1).float().sum(1)
    return y.view(*x.shape[:-1], -1).to(x.dtype)


@dataclass(frozen=True)
class Int8:
    """int8 weights [out, in] with a bfloat16 scale per output row (engine/quant.py). `form` "cpu-bf16":
    torch's packed CPU kernel on bfloat16 activations, except for several rows of a layer split by its
    inputs (prefill of o_proj, down_proj), which dequantise into float32 like "dequant": a dequantising
    multiply-sum, so the ranks' partial sums are float32."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None
    form: str = "dequant"
    chunk: int | None = None  # split by its inputs: sum in chunks of this many (see `chunked`)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = lambda rows: torch._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.form == "cpu-bf16" and self.chunk and x.shape[-2] == 1:
            y = chunked(kernel, x, self.chunk)
        elif self.form == "cpu-bf16" and not self.chunk:
            y = kernel(rows_of(x)).view(*x.shape[:-1], -1).to(x.dtype)
        else:  # the row scale applies after the sum
            w = self.weight.to(x.dtype)
            if x.shape[-2] == 1 and torch.compiler.is_compiling():
                y = (w * x.unsqueeze(-2)).sum(-1)  # fused: the int8 weights are read once, at a byte each
            else:
                y = F.linear(x, w)
            y = y * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scales, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        for t, d in ((self.weight, dim), (self.scales, 0), (self.bias, 0)):
            if t is not None and (t is self.weight or dim == 0) and t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)


DEQUANT_ROWS = 4096  # rows of a layer dequantised at once outside the compiled decode step


@dataclass(frozen=True)
class Int4:
    """4-bit weights, two a byte, with a bfloat16 scale and zero per group of inputs; rows padded to a
    multiple of 16, the padding cut from the output. `form` "cpu-bf16": `packed` is torch's CPU int4
    layout, multiplied by its kernel on bfloat16 activations; "dequant": `packed` is quant.pack_nibbles'
    layout, dequantised in a multiply-sum."""

    packed: torch.Tensor  # [out (padded), in / 2] uint8
    scales_zeros: torch.Tensor  # [in / group, out (padded), 2] bfloat16, as the kernels take them
    rows: int
    group: int
    bias: torch.Tensor | None = None
    form: str = "dequant"
    chunk: int | None = None  # split by its inputs: sum in chunks of this many (see `chunked`)

    @classmethod
    def build(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, form: str,
              bias: torch.Tensor | None = None, chunk: int | None = None) -> "Int4":
        """From quant.quantise_int4's values [out, in] and per-group scales and zeros [out, in / group]."""
        rows, pad = q.shape[0], quant.padded_rows(q.shape[0]) - q.shape[0]
        q, scales, zeros = (F.pad(t, (0, 0, 0, pad)) for t in (q, scales, zeros))
        if form == "cpu-bf16":
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        else:
            packed = quant.pack_nibbles(q, group)
        scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scales_zeros, rows, group, bias, form, chunk)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = lambda rows: torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_zeros)
        if self.form == "cpu-bf16" and self.chunk and x.shape[-2] == 1:
            y = chunked(kernel, x, self.chunk)
        elif self.form == "cpu-bf16" and not self.chunk:
            y = kernel(rows_of(x)).view(*x.shape[:-1], -1).to(x.dtype)
        elif x.shape[-2] == 1 and torch.compiler.is_compiling():
            y = (self.dequantised(x.dtype) * x.unsqueeze(-2)).sum(-1)  # fused with the unpacking: half a byte a weight
        elif self.form == "cpu-bf16":
            y = F.linear(x, self.dequantised(x.dtype))
        else:  # block by block of rows, so a large layer (the LM head) never exists whole in float32
            y = torch.cat([F.linear(x, self.dequantised(x.dtype, a, a + DEQUANT_ROWS))
                           for a in range(0, self.packed.shape[0], DEQUANT_ROWS)], dim=-1)
        y = y[..., : self.rows]
        return y if self.bias is None else y + self.bias

    def dequantised(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The weights [out (padded), in] in `dtype`. torch's CPU layout is read back through its own kernel
        (an identity input: each output is one weight, exact in bfloat16's rounding), the same on every rank."""
        if self.form == "cpu-bf16":
            inputs = self.packed.shape[1] * 2
            eye = torch.eye(inputs, dtype=torch.bfloat16, device=self.packed.device)
            return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).T.to(dtype)
        sz = self.scales_zeros.transpose(0, 1)[start:end]  # [out, groups, 2]
        return quant.dequantise_int4(self.packed[start:end], sz[..., 0], sz[..., 1], dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scales_zeros, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        """Kept static: a move that changes this layer's shape recompiles it (int4 layouts are blocked)."""


Linear = Dense | Int8 | Int4


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
