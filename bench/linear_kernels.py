"""CPU kernels for weight-only int8 and int4 decode linears, side by side, and their exact behaviour.

For each weight shape of SmolLM2-135M (and a Llama-8B one) it times, at decode batch sizes:
F.linear in fp32 and bf16 (the baselines), the compiled fp32 multiply-sum the engine uses today,
`torch._weight_int8pack_mm` (bf16 and fp32 activations) against a compiled dequantising
multiply-sum, and `torch._weight_int4pack_mm_for_cpu` (group sizes 32/64/128, bf16 and fp32
activations) against a compiled multiply-sum over nibble-packed uint8 weights.

A sample is one call (or --sample-ms worth of calls); successive calls cycle through copies of the
weights at least --pool-mib large, so that weights come from memory, as in decode, not from the
L2/L3 caches. Methods are sampled in turns, so the machine's noise falls on all of them alike.
GB/s counts every byte of the weight representation (quantised values, scales, zeros).
`us` is the median, `best us` the fastest sample, `x fp32` the fp32 F.linear median over this one,
`err` max |y - y_fp32| / max |y_fp32| against F.linear on the unquantised fp32 weights.
On a shared machine, parallel kernels stall whenever another process takes a core (medians of many
milliseconds at 2 threads); --threads 1 then gives the steadier ratios.
Before the table: the CPU's features and API facts; after it, the exactness checks (row and column split).

API constraints found (torch 2.13 CPU):
- `_weight_int8pack_mm(x [M, K], w int8 [N, K] contiguous, scales [N])`: x 2-D contiguous, fp32/bf16/fp16;
  scales in x's dtype; output [M, N] in x's dtype. Any N, K.
- `_convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, inner_k_tiles)`: N % 16 == 0, K even;
  returns uint8 [N, K/2] in 64-row blocks (a row slice of it is a valid pack only at multiples of 64);
  inner_k_tiles is ignored; values above 15 are not checked.
- `_weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros [K/gs, N, 2])`: group size
  32/64/128/256 with K % group_size == 0 (so 128 does not fit K = 576); scales_and_zeros contiguous, in x's
  dtype; w = (q - 8) * scale + zero; output in x's dtype. fp32 x is accepted but runs a slow path.

    python bench/linear_kernels.py [--rows 1 4] [--repeat 30] [--threads 1] [--shapes q_proj lm_head] [--big]
"""

import argparse
import importlib.util
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch._dynamo.config
import torch._inductor.config
import torch.nn.functional as F

SHAPES = [  # (name, N = out features, K = in features)
    ("q_proj", 576, 576),
    ("kv_proj", 384, 576),  # k and v fused: 2 x 3 KV heads x 64
    ("o_proj", 576, 576),
    ("gate_up", 3072, 576),  # gate and up fused: 2 x 1536
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
    ("8b_attn", 4096, 4096),
]
BIG_SHAPES = [("8b_gate_up", 28672, 4096)]
GROUP_SIZES = (32, 64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INNER_K_TILES = 2  # ignored on CPU: any int gives the same packing


@dataclass(frozen=True)
class Case:
    label: str
    fn: Callable  # fn(x, *weights) -> [B, N]
    x: torch.Tensor  # [B, K]
    weights: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights)

    def __call__(self, weights=None) -> torch.Tensor:
        return self.fn(self.x, *(weights or self.weights))


# --- quantisation (gpt-fast quantize.py conventions) ---

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: w ~ q * scales[:, None], q int8 [N, K], scales fp32 [N]."""
    scales = w.abs().amax(1).clamp(min=1e-8) / 127
    return torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group: w ~ (q - 8) * scale + zero, q int32 in 0..15 [N, K], scale/zero [N, K/gs]."""
    n, k = w.shape
    wg = w.view(n, k // gs, gs)  # [N, G, gs]
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, lo + 8 * scale


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] twice -> [G, N, 2] in the activation dtype. Must be contiguous: a strided view is read wrongly."""
    return torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype)  # [G, N, 2]


def nibble_pack(q: torch.Tensor, gs: int) -> torch.Tensor:
    """int32 [N, K] in 0..15 -> uint8 [N, K/2]; byte j of a group holds k = j (low nibble) and k = j + gs/2 (high).

    This layout keeps both halves of a group contiguous, which inductor vectorises; interleaved nibbles
    (k = 2j low, 2j + 1 high) compile to gathers and run about 8x slower.
    """
    n, k = q.shape
    qg = q.view(n, k // gs, 2, gs // 2)  # [N, G, 2, gs/2]
    return (qg[:, :, 0] | (qg[:, :, 1] << 4)).to(torch.uint8).view(n, k // 2)


# --- kernels ---

def int4pack_mm(x, packed, sz, *, group_size):
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


def mul_sum(x, w):
    return (w * x.unsqueeze(-2)).sum(-1)  # [B, 1, K] * [N, K] -> [B, N]


def int8_dequant_mul_sum(x, q, scales):
    return (q.to(x.dtype) * x.unsqueeze(-2)).sum(-1) * scales  # [B, N]


def int4_dequant_mul_sum(x, packed, scale, zero):
    n, groups = scale.shape
    pg = packed.view(n, groups, -1)  # [N, G, gs/2]
    xg = x.view(x.shape[0], 1, groups, 2, -1)  # [B, 1, G, 2, gs/2]
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)  # [N, G, 1]
    lo = ((pg & 15).to(x.dtype) - 8) * s + z  # k = j of each group
    hi = ((pg >> 4).to(x.dtype) - 8) * s + z  # k = j + gs/2
    return (lo * xg[..., 0, :] + hi * xg[..., 1, :]).sum((-1, -2))  # [B, N]


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def cases(w: torch.Tensor, x: torch.Tensor, kernels: dict) -> Iterator[Case]:
    """Every method for one fp32 weight [N, K] and fp32 activations [B, K]."""
    yield Case("F.linear fp32", F.linear, x, (w,))
    yield Case("F.linear bf16", F.linear, x.bfloat16(), (w.bfloat16(),))
    yield Case("compiled mul-sum fp32", kernels["mul_sum"], x, (w,))
    q8, s8 = quantize_int8(w)
    for name, dt in DTYPES.items():
        yield Case(f"int8pack_mm x={name}", torch._weight_int8pack_mm, x.to(dt), (q8, s8.to(dt)))
    for name, dt in DTYPES.items():
        yield Case(f"compiled int8 deq {name}", kernels["int8"], x.to(dt), (q8, s8.to(dt)))
    del q8, s8
    for gs in GROUP_SIZES:
        if w.shape[1] % gs:
            continue  # the kernel needs K % group_size == 0 (576 % 128 != 0)
        q4, scale, zero = quantize_int4(w, gs)
        packed = torch._convert_weight_to_int4pack_for_cpu(q4, INNER_K_TILES)  # uint8 [N, K/2]
        for name, dt in DTYPES.items():
            sz = scales_and_zeros(scale, zero, dt)
            yield Case(f"int4pack_mm g{gs} x={name}", partial(int4pack_mm, group_size=gs), x.to(dt), (packed, sz))
        yield Case(f"compiled int4 deq g{gs} fp32", kernels["int4"], x, (nibble_pack(q4, gs), scale, zero))


# --- timing ---

class Timer:
    """Samples of about sample_s (at least one call) for one case, cycling through copies of its weights
    worth pool_bytes, so that a copy comes back only after pool_bytes of others went through the caches."""

    def __init__(self, case: Case, pool_bytes: int, sample_s: float):
        self.case, self.samples, self.cursor = case, [], 0
        copies = max(1, math.ceil(pool_bytes / case.nbytes))
        self.pool = [case.weights] + [tuple(t.clone() for t in case.weights) for _ in range(copies - 1)]
        for _ in range(3):
            case()  # warm-up: compiles
        t = time.perf_counter()
        case()
        self.calls = max(1, round(sample_s / (time.perf_counter() - t)))

    def sample(self, budget_s: float = 0.5):
        if len(self.samples) >= 5 and sum(self.samples) * self.calls > budget_s:
            return  # a slow case: enough samples
        t = time.perf_counter()
        for j in range(self.cursor, self.cursor + self.calls):
            self.case(self.pool[j % len(self.pool)])
        self.samples.append((time.perf_counter() - t) / self.calls)
        self.cursor += self.calls

    def median_us(self) -> float:
        return statistics.median(self.samples) * 1e6

    def best_us(self) -> float:
        return min(self.samples) * 1e6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bench_shape(name, n, k, rows, args, kernels) -> list[tuple]:
    """All methods on one shape, sampled in turns; a slow case stops after 5 samples and 0.5 s."""
    w = torch.randn(n, k) * k ** -0.5  # [N, K]
    x = torch.randn(rows, k)  # [B, K]
    ref = F.linear(x, w)
    timers = [Timer(case, args.pool_mib << 20, args.sample_ms / 1e3) for case in cases(w, x, kernels)]
    for _ in range(args.repeat):
        for timer in timers:
            timer.sample()
    base = timers[0].median_us()  # the first case is fp32 F.linear
    return [(f"{name} {n}x{k}", t.case.label, t.median_us(), t.best_us(), t.case.nbytes / t.median_us() / 1e3,
             base / t.median_us(), rel_err(t.case(), ref)) for t in timers]


def print_table(rows_, title):
    print(f"\n{title}\n{'shape':<22}{'method':<28}{'us':>10}{'best us':>10}{'GB/s':>8}{'x fp32':>8}{'err':>10}")
    for shape, label, us, best, gbs, ratio, err in rows_:
        print(f"{shape:<22}{label:<28}{us:>10.1f}{best:>10.1f}{gbs:>8.2f}{ratio:>8.2f}{err:>10.1e}")


# --- exactness ---

@dataclass(frozen=True)
class Quantised:
    """One weight quantised once; `mm` runs the kernel on any rows x columns block of it, packed alone."""
    dtype: torch.dtype
    gs: int | None  # None: int8 per channel
    q: torch.Tensor  # [N, K]
    scale: torch.Tensor  # [N] or [N, G]
    zero: torch.Tensor | None  # [N, G]

    @classmethod
    def of(cls, w, dtype, gs=None):
        return cls(dtype, None, *quantize_int8(w), None) if gs is None else cls(dtype, gs, *quantize_int4(w, gs))

    def dequantised(self) -> torch.Tensor:
        if self.gs is None:
            return self.q.double() * self.scale.double()[:, None]
        expand = partial(torch.repeat_interleave, repeats=self.gs, dim=1)  # [N, G] -> [N, K]
        return (self.q.double() - 8) * expand(self.scale.double()) + expand(self.zero.double())

    def mm(self, x, rows=slice(None), cols=slice(None)) -> torch.Tensor:
        q, x = self.q[rows, cols].contiguous(), x.to(self.dtype)
        if self.gs is None:
            return torch._weight_int8pack_mm(x, q, self.scale[rows].to(self.dtype))
        groups = slice(None if cols.start is None else cols.start // self.gs,
                       None if cols.stop is None else cols.stop // self.gs)
        sz = scales_and_zeros(self.scale[rows, groups], self.zero[rows, groups], self.dtype)
        return int4pack_mm(x, torch._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES), sz, group_size=self.gs)


def row_split_exact(qw: Quantised, x, shards: int) -> bool:
    """Each shard's output (its rows packed and multiplied alone) == its slice of the full output, bitwise."""
    full, step = qw.mm(x), qw.q.shape[0] // shards
    return all(torch.equal(qw.mm(x, rows=slice(i, i + step)), full[:, i:i + step])
               for i in range(0, qw.q.shape[0], step))


def col_split_err(qw: Quantised, x) -> float:
    """K cut at the group boundary nearest the half, the two partial outputs summed in the output dtype."""
    gs = qw.gs or 32  # int8 has no groups: any cut would do
    cut = (qw.q.shape[1] // gs // 2) * gs
    parts = qw.mm(x[:, :cut].contiguous(), cols=slice(0, cut)) + qw.mm(x[:, cut:].contiguous(), cols=slice(cut, None))
    return rel_err(parts, qw.mm(x))


def exactness(rows: int):
    print(f"\nexactness, rows={rows}; errors are max|diff| / max|y|; 'kernel' = unsplit output vs fp64 "
          "on the same dequantised weights and fp32 x")
    for name, n, k in (SHAPES[0], SHAPES[4]):
        w = torch.randn(n, k) * k ** -0.5  # [N, K]
        x = torch.randn(rows, k)  # [B, K]
        for dname, dt in DTYPES.items():
            for gs in (None,) + GROUP_SIZES:
                if gs and k % gs:
                    continue
                qw = Quantised.of(w, dt, gs)
                label = "int8pack_mm" if gs is None else f"int4pack_mm g{gs}"
                kernel = rel_err(qw.mm(x), x.double() @ qw.dequantised().t())
                print(f"  {name} {n}x{k} {label:<17} x={dname}: row split bitwise 2-way "
                      f"{row_split_exact(qw, x, 2)}, 3-way {row_split_exact(qw, x, 3)}; "
                      f"K split {col_split_err(qw, x):.1e}; kernel {kernel:.1e}")


# --- API facts and machine ---

def api_facts():
    q = torch.randint(0, 16, (128, 256), dtype=torch.int32)
    packs = [torch._convert_weight_to_int4pack_for_cpu(q, t) for t in (0, 1, 2, 8, 16)]
    print("\nAPI")
    print(f"  int4 pack: int32 [N, K] -> {tuple(packs[0].shape)} {packs[0].dtype} for [128, 256]; "
          f"inner_k_tiles 0/1/2/8/16 give the same bytes: {all(torch.equal(packs[0], p) for p in packs)}")
    print(f"  packed rows are 64-row blocks: packed[64:128] == pack(q[64:128]): "
          f"{torch.equal(packs[0][64:], torch._convert_weight_to_int4pack_for_cpu(q[64:].contiguous(), 2))}, "
          f"packed[16:32] == pack(q[16:32]): "
          f"{torch.equal(packs[0][16:32], torch._convert_weight_to_int4pack_for_cpu(q[16:32].contiguous(), 2))}")
    x = torch.randn(1, 256)
    scale, zero = torch.rand(4, 128) + 0.1, torch.randn(4, 128)  # [G, N] at group size 64
    sz = torch.stack([scale, zero], -1)  # [G, N, 2] contiguous
    strided = sz.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    good, bad = (torch._weight_int4pack_mm_for_cpu(x, packs[0], 64, s) for s in (sz, strided))
    print(f"  a strided (non-contiguous) scales_and_zeros is accepted and read wrongly: "
          f"max diff {(good - bad).abs().max().item():.2f}")


def machine():
    flags = set()
    with open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), flags)
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    print(f"\nCPU flags: {' '.join(f'{f}={f in flags}' for f in wanted)}")
    print(f"torch {torch.__version__}, get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, torchao importable: {importlib.util.find_spec('torchao') is not None}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="activation rows (decode batch), e.g. 1 4")
    p.add_argument("--repeat", type=int, default=30, help="samples per median")
    p.add_argument("--pool-mib", type=int, default=128, help="MiB of weight copies cycled through (more than the L3)")
    p.add_argument("--sample-ms", type=float, default=0.0, help="calls per sample fill this much (0: one call)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--shapes", nargs="+", help="only these shape names, e.g. q_proj lm_head")
    p.add_argument("--big", action="store_true", help="also the 28672x4096 Llama-8B gate/up shape")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one graph per shape and dtype, same code object
    torch._inductor.config.compile_threads = 1  # no compile workers competing with the timed kernels
    kernels = {"mul_sum": compiled(mul_sum), "int8": compiled(int8_dequant_mul_sum),
               "int4": compiled(int4_dequant_mul_sum)}
    start = time.perf_counter()
    machine()
    api_facts()
    for rows in args.rows:
        table = []
        with torch.inference_mode():
            for name, n, k in SHAPES + (BIG_SHAPES if args.big else []):
                if args.shapes and name not in args.shapes:
                    continue
                table += bench_shape(name, n, k, rows, args, kernels)
        print_table(table, f"rows={rows}, median of {args.repeat}, {torch.get_num_threads()} threads")
        exactness(rows)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
