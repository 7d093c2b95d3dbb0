"""Decode speed at batch 1 on one GPU: the bandwidth floor, transformers and llmd, side by side.

A prepared script for a machine with one NVIDIA GPU and nothing to download: every weight is random,
made on the device. In a few minutes it measures, and prints as it goes:

1. The floor. The device's copy bandwidth B = (bytes read + bytes written) / time of a large
   device-to-device `dst.copy_(src)`, median of several: the memory traffic the device sustains.
   A decode step reads every weight byte once (all linear layers, LM head included, and the norms;
   of the embedding only one row), so no method decodes faster than B / (weight bytes read per token)
   tokens/s in that precision. "of floor" is a method's tokens/s over that.
2. transformers `generate`, greedy, bf16, static KV cache, its forward compiled by generate itself
   (`generation_config.compile_config`, mode reduce-overhead, fullgraph), on a random model of the
   shape asked for (`--shape 8b`: Llama-3.1-8B), built directly on the device.
3. llmd, one rank in this process, in bf16, int8 and int4 (weight-only, quantised at load), its
   decode step compiled, over the same random weights saved once as safetensors to a temporary
   directory (skipped, with a message, without the disk space; deleted at the end).
4. The same for the bundled model (SmolLM2-135M), with the greedy tokens of llmd bf16 against
   transformers bf16.

Decode tokens/s excludes prefill and compilation (the warm-up); compile time is printed apart, with
llmd's load time, weights on the device and peak device memory. Every phase is guarded by a deadline
(--budget-s): what does not fit is skipped, a run still going when it passes is cut short, and the
summary of what was measured is printed all the same. It exits 0.

    python bench/gpu.py                                   # on the GPU machine, about 6 minutes
    python bench/gpu.py --device cpu --shape tiny --steps 8   # the same code path on CPU, a tiny shape
"""

import argparse
import gc
import os
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import transformers
from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig
from transformers.generation.streamers import BaseStreamer

from llmd.engine import quant
from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import make_plan
from llmd.engine.worker import RankSpec, build_model, connect, load_rank

CORES = os.cpu_count() or 1
PRECISIONS = ("bf16", "int8", "int4")
WARMUP = 3  # llmd decode steps before timing: the first compiles
COMPARE = 16  # greedy tokens compared, llmd bf16 against transformers bf16
PROMPT = "Explain in a few paragraphs how a bicycle stays upright when it moves."
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES = {  # random Llama shapes; rope, norms and untied head as Llama 3.1
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=512, vocab_size=32000),
}
NEED_S = {"8b": 60.0, "tiny": 5.0, "bundled": 20.0}  # time left below which a phase is not started


class OutOfTime(BaseException):
    """The budget ran out in the middle of a phase (a BaseException: no `except Exception` swallows it)."""


def elapsed_s() -> float:
    """Seconds since this process started: the budget counts the imports too."""
    return time.time() - psutil.Process().create_time()


@dataclass
class Budget:
    seconds: float

    def left(self) -> float:
        return self.seconds - elapsed_s()

    def allows(self, report: "Report", what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        report.note(f"-- skipped {what}: {self.left():.0f} s of the budget left, it needs about {need_s:.0f} s")
        return False

    @contextmanager
    def hard_stop(self):
        """Interrupt whatever runs when the budget is spent (SIGALRM), so the summary still prints."""
        def ring(*_):
            raise OutOfTime(f"the {self.seconds:.0f} s budget ran out")

        signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class Row:
    model: str
    method: str
    tok_s: float
    floor_tok_s: float
    compile_s: float | None = None
    load_s: float | None = None
    weights_mb: float | None = None
    peak_mb: float | None = None

    @property
    def fraction(self) -> float:
        return self.tok_s / self.floor_tok_s


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        extra = "".join(f", {name} {value:.1f}" for name, value in (
            ("compile s", row.compile_s), ("load s", row.load_s), ("weights MB", row.weights_mb),
            ("peak MB", row.peak_mb)) if value is not None)
        say(f"{row.model:>8} {row.method:<22} {row.tok_s:8.1f} tok/s, {row.fraction:6.1%} of the floor "
            f"({row.floor_tok_s:.0f}){extra}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(text)

    def attempt(self, what: str, fn, *args):
        """fn(*args), or None when it fails: one failed run leaves the others to measure."""
        try:
            return fn(*args)
        except Exception as e:
            traceback.print_exc()
            self.note(f"-- {what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None

    def print_summary(self) -> None:
        say("\n== summary: decode tokens/s at batch 1 (prefill and compilation excluded)")
        say(f"{'model':>8} {'method':<22} {'tok/s':>8} {'floor':>8} {'of floor':>8} {'compile s':>9} "
            f"{'load s':>7} {'weights MB':>10} {'peak MB':>9}")
        cell = lambda v, w: f"{v:{w}.1f}" if v is not None else " " * (w - 1) + "-"
        for r in self.rows:
            say(f"{r.model:>8} {r.method:<22} {r.tok_s:8.1f} {r.floor_tok_s:8.0f} {r.fraction:8.1%} "
                f"{cell(r.compile_s, 9)} {cell(r.load_s, 7)} {cell(r.weights_mb, 10)} {cell(r.peak_mb, 9)}")
        for n in self.notes:
            say(n)


def say(text: str) -> None:
    print(text, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


# -- the floor

def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """(bytes read + bytes written) / s of a device-to-device copy of `nbytes`, median of `repeats`."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    free_memory(device)
    return 2 * nbytes / statistics.median(times[1:])


def bytes_per_token(cfg: ModelConfig, weights: str, act_bytes: int) -> int:
    """Weight bytes one decode step reads in this precision, scales and zeros included: every linear
    layer (the LM head too, a tied one over the embedding) and the norms; of the embedding, one row."""
    group = quant.group_size(cfg) if weights == "int4" else 32
    size = lambda rows, cols: quant.weight_bytes(weights, rows, cols, group)
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    layer = (size(cfg.num_heads * D, H) + size(2 * cfg.num_kv_heads * D, H) + size(H, cfg.num_heads * D)
             + size(2 * I, H) + size(H, I) + 2 * H * act_bytes)
    return cfg.num_layers * layer + size(cfg.vocab_size, H) + H * act_bytes


def floors(cfg: ModelConfig, bandwidth: float, device: str) -> dict[str, float]:
    """Floor tokens/s per precision, llmd's activation dtype for the norms."""
    out = {}
    for w in PRECISIONS:
        act = quant.activation_dtype(w, device).itemsize
        out[w] = bandwidth / bytes_per_token(cfg, w, act)
    return out


def print_floors(name: str, cfg: ModelConfig, floor: dict[str, float], device: str) -> None:
    for w in PRECISIONS:
        mb = bytes_per_token(cfg, w, quant.activation_dtype(w, device).itemsize) / 1e6
        say(f"floor {name:>8} {w}: {mb:9.1f} MB read per token -> {floor[w]:8.1f} tok/s")


# -- transformers

class Stamps(BaseStreamer):
    """Each new token and the time it came: generate hands the prompt first, then one token a step."""

    def __init__(self):
        self.tokens, self.times, self.prompt_seen = [], [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.append(int(value.reshape(-1)[-1]))  # waits for the device
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def decode_tok_s(self) -> float:
        """Tokens/s of the decode steps: the first token comes from prefill."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def prepare_hf(model, device: str) -> None:
    """Static cache, greedy, no stop at EOS; generate compiles its own decode forward (CompileConfig),
    which it does by itself on CUDA and on CPU only when asked."""
    g = model.generation_config
    g.cache_implementation = "static"
    g.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    if device != "cuda":
        g.compile_config._compile_all_devices = True
    g.do_sample, g.temperature, g.top_p, g.top_k = False, None, None, None
    g.eos_token_id = None


def hf_generate(model, prompt: list[int], new_tokens: int, device: str) -> tuple[Stamps, float]:
    ids = torch.tensor([prompt], device=device)
    stamps = Stamps()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, streamer=stamps)
    sync(device)
    return stamps, time.perf_counter() - t


def measure_hf(report: Report, name: str, model, prompt: list[int], steps: int, floor: float,
               device: str) -> list[int]:
    """Warm-up generate (compiles), then the measured one, of the same length (the same cache shape):
    a prefill and `steps` timed decode steps (more, untimed, when COMPARE asks for more tokens)."""
    prepare_hf(model, device)
    new = max(steps + 1, COMPARE)
    _, warm_s = hf_generate(model, prompt, new, device)
    stamps, run_s = hf_generate(model, prompt, new, device)
    report.add(Row(name, "transformers bf16", stamps.decode_tok_s(), floor, compile_s=warm_s - run_s,
                   peak_mb=peak_mb(device)))
    return stamps.tokens


def random_hf_model(shape: str, device: str):
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # made on the device: no copy of the weights on the host
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


# -- llmd

def llmd_spec(model_dir: Path, cfg: ModelConfig, weights: str, device: str, context: int) -> RankSpec:
    dtype = str(quant.activation_dtype(weights, device)).removeprefix("torch.")
    plan = make_plan(cfg, [1.0], quant.column_unit(cfg, weights))
    return RankSpec(model_dir=str(model_dir), plan=plan.to_dict(), rank=0, device=device, dtype=dtype,
                    weights=weights, context=context, threads=CORES, compile=True)


def decode(model, tokens: list[int], pos: int, n: int, device: str) -> float:
    """`n` greedy decode steps from the last token, at position `pos` on, appended to `tokens`; seconds."""
    t = time.perf_counter()
    for i in range(n):
        logits = model.forward(torch.tensor([[tokens[-1]]], device=device), [0], [pos + i])  # [1, V]
        tokens.append(int(logits.argmax(-1)))  # waits for the device
    return time.perf_counter() - t


def measure_llmd(report: Report, name: str, model_dir: Path, weights: str, prompt: list[int], steps: int,
                 floor: float, device: str) -> list[int]:
    """One rank in this process: load, prefill, WARMUP decode steps (the first compiles), `steps` timed."""
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    spec = llmd_spec(model_dir, cfg, weights, device, len(prompt) + WARMUP + max(steps, COMPARE) + 8)
    free_memory(device)
    t = time.perf_counter()
    model = build_model(spec, load_rank(spec), connect(spec, None, 1))
    sync(device)
    load_s = time.perf_counter() - t
    logits = model.forward(torch.tensor([prompt], device=device), [0], [0])  # prefill, eager: [1, V]
    tokens = [int(logits.argmax(-1))]
    first_s = decode(model, tokens, len(prompt), 1, device)  # compiles
    decode(model, tokens, len(prompt) + 1, WARMUP - 1, device)
    tok_s = steps / decode(model, tokens, len(prompt) + WARMUP, steps, device)
    decode(model, tokens, len(prompt) + len(tokens) - 1, COMPARE - len(tokens), device)  # untimed, to compare
    report.add(Row(name, f"llmd {weights} ({spec.dtype})", tok_s, floor, compile_s=first_s - 1 / tok_s,
                   load_s=load_s, weights_mb=model.w.nbytes() / 2**20, peak_mb=peak_mb(device)))
    del model
    torch._dynamo.reset()  # the next run compiles afresh, and its compile time is its own
    free_memory(device)
    return tokens


def measure_all_llmd(report: Report, budget: Budget, name: str, model_dir: Path, prompt: list[int],
                     floor: dict[str, float], args) -> dict[str, list[int]]:
    tokens = {}
    for w in PRECISIONS:
        if budget.allows(report, f"{name} llmd {w}", NEED_S[name]):
            tokens[w] = report.attempt(f"{name} llmd {w}", measure_llmd, report, name, model_dir, w, prompt,
                                       args.steps, floor[w], args.device)
    return tokens


# -- the two models

def run_random(report: Report, args, bandwidth: float, budget: Budget) -> None:
    """The random model of --shape: transformers on the device, then llmd over it saved as safetensors."""
    name, device = args.shape, args.device
    if not budget.allows(report, f"the {name} shape", NEED_S[name]):
        return
    model = random_hf_model(name, device)
    cfg = ModelConfig.from_hf(model.config)
    floor = floors(cfg, bandwidth, device)
    print_floors(name, cfg, floor, device)
    prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    hf_tokens = report.attempt(f"{name} transformers", measure_hf, report, name, model, prompt, args.steps,
                               floor["bf16"], device)
    need = int(bytes_per_token(cfg, "bf16", 2) + cfg.vocab_size * cfg.hidden_size * 2) + 2**30
    tmp = Path(args.tmp or tempfile.gettempdir())
    if shutil.disk_usage(tmp).free < need:
        report.note(f"-- llmd on {name} skipped: {need / 1e9:.1f} GB needed in {tmp} for the bf16 checkpoint, "
                    f"{shutil.disk_usage(tmp).free / 1e9:.1f} GB free (--tmp DIR to choose another)")
        return
    model_dir = Path(tempfile.mkdtemp(prefix="llmd-gpu-bench-", dir=tmp))
    try:
        if not budget.allows(report, f"saving the {name} checkpoint", NEED_S[name]):
            return
        t = time.perf_counter()
        model.save_pretrained(model_dir, safe_serialization=True)
        size = sum(f.stat().st_size for f in model_dir.iterdir())
        say(f"saved the random {name} checkpoint ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
        del model
        torch._dynamo.reset()  # drops transformers' compiled forward and its CUDA graphs
        free_memory(device)
        llmd_tokens = measure_all_llmd(report, budget, name, model_dir, prompt, floor, args)
        if hf_tokens and llmd_tokens.get("bf16"):  # random weights: near-ties in bf16, an early split is no error
            report.note(compare_tokens(name, hf_tokens, llmd_tokens["bf16"]))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def run_bundled(report: Report, args, bandwidth: float, budget: Budget) -> None:
    """The bundled SmolLM2-135M: transformers loads its directory, llmd reads the same safetensors."""
    from llmd.app.text import TextModel

    device = args.device
    if not budget.allows(report, "the bundled model", NEED_S["bundled"]):
        return
    model_dir = resolve_model("default")
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    floor = floors(cfg, bandwidth, device)
    print_floors("bundled", cfg, floor, device)
    prompt = TextModel.load(model_dir).chat_ids([{"role": "user", "content": PROMPT}])
    free_memory(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    hf_tokens = report.attempt("bundled transformers", measure_hf, report, "bundled", model, prompt, args.steps,
                               floor["bf16"], device)
    del model
    torch._dynamo.reset()
    free_memory(device)
    llmd_tokens = measure_all_llmd(report, budget, "bundled", model_dir, prompt, floor, args)
    if hf_tokens and llmd_tokens.get("bf16"):
        report.note(compare_tokens("bundled", hf_tokens, llmd_tokens["bf16"]))


def compare_tokens(name: str, hf: list[int], llmd: list[int]) -> str:
    """The first COMPARE greedy tokens of transformers bf16 and llmd bf16, and where they part."""
    hf, llmd = hf[:COMPARE], llmd[:COMPARE]
    differ = [i for i, (a, b) in enumerate(zip(hf, llmd)) if a != b]
    verdict = "identical" if hf == llmd else f"differ from token {differ[0] if differ else min(len(hf), len(llmd))}"
    return (f"{name} greedy tokens, first {COMPARE}: {verdict}\n  transformers bf16: {hf}\n"
            f"  llmd bf16:         {llmd}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="the random model's shape")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per run")
    parser.add_argument("--skip-8b", action="store_true", help="no random model: only the bundled one")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop and summarise after this long")
    parser.add_argument("--copy-gb", type=float, default=2.0, help="size of the bandwidth copy (CPU: /8)")
    parser.add_argument("--tmp", help="where to save the random checkpoint (default: the temp directory)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device visible to torch (a CPU-only build?): nothing measured; try --device cpu --shape tiny")
        return 0
    report, budget = Report(), Budget(args.budget_s)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {CORES} cores"
    say(f"== {device_name}, torch {torch.__version__}, batch 1, {args.steps} timed decode steps")
    try:
        with budget.hard_stop():
            size = int(args.copy_gb * 1e9 / (1 if args.device == "cuda" else 8))
            bandwidth = copy_bandwidth(args.device, size)
            say(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + written, {size / 1e9:.2f} GB copied)")
            if not (args.skip_8b and args.shape == "8b"):
                run_random(report, args, bandwidth, budget)
            run_bundled(report, args, bandwidth, budget)
    except OutOfTime as e:
        report.note(f"-- stopped: {e}; the rest was not measured")
    except Exception as e:  # a failed phase still leaves what was measured before it
        traceback.print_exc()
        report.note(f"-- failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    report.print_summary()
    say(f"total {elapsed_s():.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
