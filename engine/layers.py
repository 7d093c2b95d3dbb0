"""Linear layers with one call signature, y = linear(x), whatever form holds the weights.

The model's math calls a linear layer and never looks at its weights, so the same blocks run
dense or quantised weights, eager or compiled.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import dequantise_int4


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

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        """Let a compiled caller treat the weight's sharded dimension (0 out, 1 in) as symbolic, so the
        balancer's moves reuse the same code. A dimension of size 1 cannot be: the compiler specialises it."""
        for t, d in ((self.weight, dim), (self.bias, 0)):
            if t is not None and (t is self.weight or dim == 0) and t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)


@dataclass(frozen=True)
class Int8:
    """int8 weights [out, in] with a float32 scale per output row (engine/quant.py)."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The row scale applies after the sum, the same on every rank, so partial sums stay exact.
        w = self.weight.to(x.dtype)
        if x.shape[-2] == 1 and torch.compiler.is_compiling():
            y = (w * x.unsqueeze(-2)).sum(-1)  # fused: the int8 weights are read once, at a byte each
        else:
            y = F.linear(x, w)
        y = y * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scales, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        for t, d in ((self.weight, dim), (self.scales, 0), (self.bias, 0)):
            if t is not None and (t is self.weight or dim == 0) and t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)


@dataclass(frozen=True)
class Int4:
    """4-bit weights, two a byte [out, in / 2], with a bfloat16 scale and zero per group of inputs."""

    packed: torch.Tensor
    scales: torch.Tensor  # [out, in / group]
    zeros: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantise_int4(self.packed, self.scales, self.zeros, x.dtype)
        if x.shape[-2] == 1 and torch.compiler.is_compiling():
            y = (w * x.unsqueeze(-2)).sum(-1)  # fused with the unpacking: half a byte read per weight
        else:
            y = F.linear(x, w)
        return y if self.bias is None else y + self.bias

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scales, self.zeros, self.bias) if t is not None]

    def mark_dynamic(self, dim: int) -> None:
        """Rows may be symbolic; the packed input dimension stays static (a move of MLP columns recompiles)."""
        if dim == 0:
            for t in self.tensors():
                if t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)


Linear = Dense | Int8 | Int4


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
