"""engine/model.py's compiled blocks, which return their linear layers' inputs, against the same blocks
whose inputs are dropped.

engine/model.py's blocks return the input of each linear layer (a norm's output, SiLU(gate) * up)
beside their result. Without that, the compiler folds the norm or the SiLU into the matrix-vector loop that
consumes it and recomputes it for every row of weights. This times both forms of the bundled model's MLP
block and of its LM head (one token, int8 and fp32 weights, 1 and 2 threads), side by side in one run: each
sample is one call, the forms taken in turns, each call on another copy of the weights (more copies
than the caches hold).

    .venv/bin/python bench/fused_inputs.py [--threads 1 2] [--repeat 200]
"""

import argparse
import statistics
import time

import torch

from llmd.engine.layers import Dense, Int8
from llmd.engine.model import head_block, mlp_block
from llmd.engine.quant import int8_scales, quantise_int8

H, COLS, VOCAB = 576, 1536, 49152  # SmolLM2-135M
POOL_BYTES = 256 << 20


def linear(weights: str, rows: int, cols: int):
    w = torch.randn(rows, cols) / cols**0.5
    if weights == "fp32":
        return Dense(w)
    scales = int8_scales(w)
    return Int8(quantise_int8(w, scales), scales)


def folded(block):
    """The block as it was before: its result alone, so the compiler may fold the inputs it computes
    into the loops that consume them."""
    def result_only(*args):
        return block(*args)[0]
    return result_only


def mlp_args(weights: str):
    return torch.randn(1, 1, H), torch.rand(H), linear(weights, 2 * COLS, H), linear(weights, H, COLS), 1e-5


def head_args(weights: str):
    return torch.randn(1, 1, H), torch.rand(H), linear(weights, VOCAB, H), 1e-5


def per_copy_bytes(args) -> int:
    return sum(t.numel() * t.element_size() for a in args if hasattr(a, "tensors") for t in a.tensors())


def time_pair(block, make_args, weights: str, repeat: int) -> tuple[float, float]:
    """Median microseconds of (inputs returned, inputs dropped), sampled in turns."""
    first = make_args(weights)
    copies = [first] + [make_args(weights) for _ in range(max(1, POOL_BYTES // per_copy_bytes(first)) - 1)]
    forms = [torch.compile(block, dynamic=False), torch.compile(folded(block), dynamic=False)]
    samples = [[], []]
    with torch.inference_mode():
        for f in forms:
            f(*first)  # compile
        for i in range(repeat):
            for j, (f, out) in enumerate(zip(forms, samples)):
                args = copies[(2 * i + j) % len(copies)]  # never the copy the call before just read
                t = time.perf_counter()
                f(*args)
                out.append(time.perf_counter() - t)
    return statistics.median(samples[0]) * 1e6, statistics.median(samples[1]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    print("block     weights  threads  inputs returned us  inputs dropped us  speed-up")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, block, make_args in (("mlp", mlp_block, mlp_args), ("lm_head", head_block, head_args)):
            for weights in ("int8", "fp32"):
                kept, dropped = time_pair(block, make_args, weights, args.repeat)
                print(f"{name:8s}  {weights:7s}  {threads:7d}  {kept:18.1f}  {dropped:17.1f}  {dropped / kept:7.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
