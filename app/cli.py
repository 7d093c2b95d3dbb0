"""The `llmd` command: a thin layer over the engine's Python API."""

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.errors import LlmdError
from llmd.engine.plan import make_plan, parse_shares
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec

from .launch import LocalCluster
from .text import TextModel


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="`default` (bundled SmolLM2-135M-Instruct), a HF directory or a .gguf file")
    p.add_argument("--workers", type=int, default=1, help="number of ranks on this machine (default 1)")
    p.add_argument("--shares", help="relative share of each rank, e.g. 2,1 (default even)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--context", type=int, help="KV cache length in tokens (default min(2048, the model's))")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / workers)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any rank may wait for another (default 120)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the decode step (auto: on CPU when a C++ compiler is present)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens even past end-of-text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmd", description="Pool the spare GPUs of an office into one LLM cluster.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text once",
                         description="Generate a reply. Example: llmd generate --workers 2 --chat 'Name three colours.'")
    add_engine_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--dump-logits", metavar="FILE", help="save prefill and decode logits (torch.save) for checks")
    gen.add_argument("prompt")

    chat = sub.add_parser("chat", help="chat in the terminal",
                          description="Chat with a model split over local workers. Example: llmd chat --workers 2")
    add_engine_options(chat)
    add_sampling_options(chat)
    chat.add_argument("--system", help="system message")
    return parser


@dataclass
class Setup:
    spec: RankSpec
    world_size: int
    text: TextModel


def prepare(args) -> Setup:
    """Validate the options and resolve the model before any process starts."""
    if args.workers < 1:
        raise LlmdError("--workers must be at least 1")
    if not args.timeout > 0:
        raise LlmdError("--timeout must be a positive number of seconds")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LlmdError("--device cuda but no CUDA GPU is visible to torch")
    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    plan = make_plan(cfg, parse_shares(args.shares, args.workers))
    limit = min(cfg.max_positions, cfg.sliding_window or cfg.max_positions)
    context = args.context or min(2048, limit)
    if not 1 < context <= limit:
        raise LlmdError(f"--context must be between 2 and {limit} for this model")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    spec = RankSpec(model_dir=str(model_dir), plan=plan.to_dict(), rank=0, device=args.device,
                    context=context, threads=threads, timeout_s=args.timeout, compile=want_compile(args))
    return Setup(spec, args.workers, TextModel.load(model_dir))


def want_compile(args) -> bool:
    if args.compile != "auto":
        return args.compile == "on"
    has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    return args.device == "cpu" and has_cxx


def sampling_params(args, text: TextModel) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop_token_ids=[] if args.ignore_eos else text.stop_token_ids, seed=args.seed)


def cmd_generate(args) -> int:
    setup = prepare(args)
    text = setup.text
    params = sampling_params(args, text)
    prompt_ids = text.chat_ids([{"role": "user", "content": args.prompt}]) if args.chat else text.encode(args.prompt)
    with LocalCluster(setup.spec, setup.world_size) as cluster:
        driver = cluster.driver
        stream = None if args.json else text.streamer(sys.stdout)
        gen = driver.generate(prompt_ids, params, on_token=stream, record_logits=bool(args.dump_logits))
        stats = driver.stats()
    if args.dump_logits:
        save_logits(Path(args.dump_logits), gen)
    if not args.json:
        print(flush=True)
        return 0
    print(json.dumps({
        "text": text.decode(gen.token_ids),
        "token_ids": gen.token_ids,
        "prompt_token_ids": prompt_ids,
        "prefill_s": round(gen.prefill_s, 6),
        "decode_tokens_per_s": round(gen.decode_tokens_per_s, 3),
        "peak_rss_mb_per_rank": [s["peak_rss_mb"] for s in stats],
        "weights_mb_per_rank": [s["weights_mb"] for s in stats],
        "finish_reason": gen.finish_reason,
        "plan": setup.spec.plan,
    }))
    return 0


def save_logits(path: Path, gen) -> None:
    import torch

    decode = torch.stack(gen.decode_logits) if gen.decode_logits else torch.empty(0)
    torch.save({"prefill": gen.prefill_logits, "decode": decode, "token_ids": gen.token_ids}, path)


def cmd_chat(args) -> int:
    setup = prepare(args)
    text = setup.text
    params = sampling_params(args, text)
    history = [{"role": "system", "content": args.system}] if args.system else []
    with LocalCluster(setup.spec, setup.world_size) as cluster:
        print(f"llmd: {Path(setup.spec.model_dir).name} on {setup.world_size} worker(s). "
              "Type a message; Ctrl-D to quit.", flush=True)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            print("llmd> ", end="", flush=True)
            gen = cluster.driver.generate(text.chat_ids(history), params, on_token=text.streamer(sys.stdout))
            reply = text.decode(gen.token_ids)
            history.append({"role": "assistant", "content": reply})
            print(f"\n[{len(gen.token_ids)} tokens, {gen.decode_tokens_per_s:.1f} tokens/s, "
                  f"first token {gen.prefill_s * 1000:.0f} ms]", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)
    except LlmdError as e:
        print(f"llmd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
