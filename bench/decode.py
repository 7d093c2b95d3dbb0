"""Decode speed on the bundled model, batch 1: transformers' generate vs llmd, side by side.

One process run measures, in this order: the machine's memory bandwidth (a large
matrix-vector product, the fastest of BLAS and a compiled multiply-sum), HF
`generate` in its best CPU settings (fp32, SDPA, inference mode, all cores; the
faster of its dynamic and static KV caches), llmd with 1 worker and llmd with
2 workers. Each figure is the median of --repeats runs. It prints decode
tokens/s (prefill excluded), the ratio llmd/HF and llmd's fraction of the
bandwidth floor (bytes of weights read per token / bandwidth).

    python bench/decode.py [--new-tokens 128] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from llmd.app.launch import LocalCluster
from llmd.app.text import TextModel
from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import make_plan
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec

PROMPT = "Explain in a few paragraphs how a bicycle stays upright when it moves."
CORES = os.cpu_count() or 1


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_bandwidth(repeats: int) -> dict:
    """Bytes/s of the fastest matrix-vector product we know over a 512 MiB fp32 matrix."""
    torch.set_num_threads(CORES)
    w = torch.randn(32768, 4096)
    x = torch.randn(1, 4096)
    fused = torch.compile(lambda x, w: (w * x.unsqueeze(-2)).sum(-1), dynamic=False)
    size = w.numel() * w.element_size()
    blas = size / median_time(lambda: torch.nn.functional.linear(x, w), repeats)
    compiled = size / median_time(lambda: fused(x, w), repeats)
    return {"blas_gb_s": blas / 1e9, "compiled_gb_s": compiled / 1e9, "best_gb_s": max(blas, compiled) / 1e9}


def hf_decode_tokens_per_s(model_dir, prompt_ids, new_tokens: int, repeats: int) -> dict:
    torch.set_num_threads(CORES)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    results = {}
    for cache in ("dynamic", "static"):
        def run(n, cache=cache):
            kwargs = {"cache_implementation": "static"} if cache == "static" else {}
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
        prefill = median_time(lambda: run(1), repeats)
        full = median_time(lambda: run(new_tokens + 1), repeats)
        results[cache] = new_tokens / (full - prefill)
    return results


def llmd_decode_tokens_per_s(model_dir, prompt_ids, workers: int, new_tokens: int, repeats: int) -> dict:
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    spec = RankSpec(model_dir=str(model_dir), plan=make_plan(cfg, [1.0] * workers).to_dict(), rank=0,
                    threads=max(1, CORES // workers), compile=True)
    params = SamplingParams(max_new_tokens=new_tokens + 1, greedy=True)
    with LocalCluster(spec, workers) as cluster:
        cluster.driver.generate(prompt_ids, params)  # warm-up
        rates = [cluster.driver.generate(prompt_ids, params).decode_tokens_per_s for _ in range(repeats)]
        weights_mb = max(s["weights_mb"] for s in cluster.driver.stats())
    return {"tokens_per_s": statistics.median(rates), "weights_bytes_per_rank": weights_mb * 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_dir = resolve_model("default")
    prompt_ids = TextModel.load(model_dir).chat_ids([{"role": "user", "content": PROMPT}])
    bw = memory_bandwidth(args.repeats)
    hf = hf_decode_tokens_per_s(model_dir, prompt_ids, args.new_tokens, args.repeats)
    one = llmd_decode_tokens_per_s(model_dir, prompt_ids, 1, args.new_tokens, args.repeats)
    two = llmd_decode_tokens_per_s(model_dir, prompt_ids, 2, args.new_tokens, args.repeats)

    hf_best = max(hf.values())
    floor = bw["best_gb_s"] * 1e9 / one["weights_bytes_per_rank"]
    print(f"bundled model, batch 1, {len(prompt_ids)} prompt tokens, {args.new_tokens} new tokens, "
          f"{CORES} cores, median of {args.repeats}")
    print(f"memory bandwidth (matrix-vector): {bw['best_gb_s']:.1f} GB/s "
          f"(BLAS {bw['blas_gb_s']:.1f}, compiled {bw['compiled_gb_s']:.1f})")
    print(f"bandwidth floor, 1 worker ({one['weights_bytes_per_rank'] / 1e6:.0f} MB/token): {floor:.1f} tokens/s")
    print(f"HF generate, dynamic cache:  {hf['dynamic']:6.1f} tokens/s")
    print(f"HF generate, static cache:   {hf['static']:6.1f} tokens/s")
    print(f"llmd, 1 worker:              {one['tokens_per_s']:6.1f} tokens/s  "
          f"{one['tokens_per_s'] / hf_best:.2f}x HF, {one['tokens_per_s'] / floor:.0%} of the floor")
    print(f"llmd, 2 workers:             {two['tokens_per_s']:6.1f} tokens/s  {two['tokens_per_s'] / hf_best:.2f}x HF")
    print(json.dumps({"bandwidth": bw, "floor_tokens_per_s": floor, "hf": hf, "llmd_1": one["tokens_per_s"],
                      "llmd_2": two["tokens_per_s"], "ratio_llmd_1_hf": one["tokens_per_s"] / hf_best,
                      "fraction_of_floor_1": one["tokens_per_s"] / floor}))


if __name__ == "__main__":
    main()
