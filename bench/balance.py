"""The balancer against static even shares, side by side in one run.

2 workers on the bundled model, rank 0 slowed 2x (`--slowdown 0:2`: it sleeps as long again as
it computes), 256 greedy tokens. Static: even shares for the whole run. Balanced: the same start
with `--balance on`, which moves KV groups and MLP columns to rank 1 while generating.
Converged: the balanced run's final plan, static from the first token (the most the balancer's
plan allows; the gap to it is the cost of getting there). The ideal ratio is 1.5x when a step
is all weight streaming (rank 0 at half speed: even shares cost 2 units a step,
speed-proportional ones 4/3); work a rank does whatever its share (Python, dispatch,
collectives), stretched 2x on rank 0 as well, lowers it. All compile the decode step, as
`llmd generate` does on CPU (with the balancer, for shapes that may change).

    python bench/balance.py [--tokens 256] [--runs 3]
"""

import argparse
import statistics

from llmd.app.launch import LocalCluster
from llmd.app.text import TextModel
from llmd.engine.balancer import BalancerConfig, spread
from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import make_plan
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def run(model_dir, cfg, prompt_ids, tokens: int, balance: bool, plan: dict | None = None) -> dict:
    spec = RankSpec(model_dir=str(model_dir), plan=plan or make_plan(cfg, [1.0, 1.0]).to_dict(), rank=0, threads=1,
                    compile=True, reshardable=balance, slowdown=[[0, 2.0, 0]])
    params = SamplingParams(max_new_tokens=tokens + 1, greedy=True, stop_token_ids=[])
    with LocalCluster(spec, 2, BalancerConfig() if balance else None) as cluster:
        gen = cluster.driver.generate(prompt_ids, params)
        final_plan = cluster.driver.plan.to_dict()
    done = [e for e in gen.migrations if e["status"] == "done"]
    last = done[-1] if done else None
    return {
        "tokens_per_s": gen.decode_tokens_per_s,
        "migrations": len(done),
        "converged_step": last["switch_step"] if last else None,
        "converged_s": sum(gen.decode_step_ms[: last["switch_step"]]) / 1e3 if last else None,
        "bytes_moved": sum(e["bytes_moved"] for e in done),
        "kv_bytes": sum(e["kv_bytes"] for e in done),
        "final_spread": spread(gen.rank_step_ms),
        "rank_step_ms": gen.rank_step_ms,
        "final_plan": final_plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model_dir = resolve_model("default")
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    prompt_ids = TextModel.load(model_dir).chat_ids([{"role": "user", "content": PROMPT}])

    rows = {"static": [], "balanced": [], "converged": []}
    for _ in range(args.runs):  # interleaved, so drifting machine load hits all alike
        rows["static"].append(run(model_dir, cfg, prompt_ids, args.tokens, balance=False))
        rows["balanced"].append(run(model_dir, cfg, prompt_ids, args.tokens, balance=True))
        # The balancer's final plan, static from the first token: what balancing could reach at best.
        rows["converged"].append(run(model_dir, cfg, prompt_ids, args.tokens, balance=False,
                                     plan=rows["balanced"][-1]["final_plan"]))

    median = {name: statistics.median(r["tokens_per_s"] for r in runs) for name, runs in rows.items()}
    print(f"2 workers, rank 0 slowed 2x, {args.tokens} tokens, median of {args.runs} runs")
    for name, runs in rows.items():
        print(f"  {name:9} {median[name]:6.2f} tokens/s   per run: "
              + ", ".join(f"{r['tokens_per_s']:.2f}" for r in runs))
    print(f"ratio balanced / static: {median['balanced'] / median['static']:.2f}x (ideal 1.5x, target >= 1.3x); "
          f"the converged plans run static from the start: {median['converged'] / median['static']:.2f}x")
    for i, r in enumerate(rows["balanced"]):
        when = f"after step {r['converged_step']} ({r['converged_s']:.1f} s)" if r["migrations"] else "never"
        print(f"  balanced run {i + 1}: {r['migrations']} migrations, last switch {when}, "
              f"{r['bytes_moved'] / 1e6:.1f} MB moved ({r['kv_bytes'] / 1e3:.0f} kB of KV cache), "
              f"final per-rank ms {r['rank_step_ms']} (spread {r['final_spread']:.0%})")


if __name__ == "__main__":
    main()
