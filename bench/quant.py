"""fp32 against int8 and int4 (and bf16) on the bundled model, side by side in one run.

For each precision and worker count: decode tokens/s at batch 1 (`llmd generate`, greedy,
the median of --rounds runs taken in turns, so a noisy moment hits every precision alike)
and the perplexity of the shipped evaluation text (`llmd eval`, teacher-forced through the
engine). Prints each precision's ratio to fp32 with the same workers.

    .venv/bin/python bench/quant.py [--workers 1 2] [--weights fp32 int8 int4] [--rounds 5]
"""

import argparse
import json
import statistics
import subprocess
import sys

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def llmd(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "llmd", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llmd {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def decode_tokens_per_s(weights: str, workers: int, tokens: int) -> float:
    out = llmd("generate", "--weights", weights, "--workers", str(workers), "--greedy", "--ignore-eos",
               "--max-new-tokens", str(tokens), "--json", PROMPT)
    return out["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--weights", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per run (default 64)")
    parser.add_argument("--eval-tokens", type=int, help="cap the evaluation text (default: all of it)")
    args = parser.parse_args()
    if "fp32" not in args.weights:
        args.weights.insert(0, "fp32")

    ppl = {}
    for w in args.weights:
        extra = ["--max-tokens", str(args.eval_tokens)] if args.eval_tokens else []
        ppl[w] = llmd("eval", "--weights", w, "--workers", "1", "--json", *extra)
        print(f"perplexity {w}: {ppl[w]['perplexity']:.4f} over {ppl[w]['tokens']} tokens", flush=True)

    speed = {(w, n): [] for w in args.weights for n in args.workers}
    for r in range(args.rounds):
        for n in args.workers:
            for w in args.weights:
                speed[w, n].append(decode_tokens_per_s(w, n, args.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{w}x{n} {v[-1]:.1f}" for (w, n), v in speed.items()), flush=True)

    print("\nweights  workers  decode tok/s (median)  x fp32   perplexity  x fp32")
    for n in args.workers:
        base = statistics.median(speed["fp32", n])
        for w in args.weights:
            med = statistics.median(speed[w, n])
            ratio_ppl = ppl[w]["perplexity"] / ppl["fp32"]["perplexity"]
            print(f"{w:7s}  {n:7d}  {med:21.1f}  {med / base:6.2f}   {ppl[w]['perplexity']:10.4f}  {ratio_ppl:6.4f}")


if __name__ == "__main__":
    main()
