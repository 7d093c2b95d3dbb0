"""The `llmd` command: a thin layer over the engine's Python API."""

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmd.engine import quant
from llmd.engine.balancer import BalancerConfig
from llmd.engine.checkpoint import resolve_model
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.errors import BadPlan, LlmdError, ModelDoesNotFit, ModelNotFound
from llmd.engine.memory import default_slots, rank_bytes
from llmd.engine.partition import describe, load_plan, parse_device, parse_link, plan_partition
from llmd.engine.presets import PRESETS, preset
from llmd.engine.runtime import check_prompt
from llmd.engine.plan import Plan, check_plan, make_pipeline_plan, parse_shares
from llmd.engine.quant import PRECISIONS
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import DTYPES, RankSpec

from .evaluate import add_eval_parser
from .host import Host, NoAgents, RemoteCluster
from .launch import Cluster, LocalCluster
from .net import primary_address
from .options import EngineOptions
from .security import load_or_create_secret, read_secret
from .text import TextModel


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="`default` (bundled SmolLM2-135M-Instruct), a HF directory or a .gguf file")
    p.add_argument("--workers", type=int, help="number of ranks on this machine (default 1, or the plan's)")
    p.add_argument("--shares", help="relative share of each rank, e.g. 2,1 (default even)")
    p.add_argument("--stages", type=int, default=1,
                   help="pipeline stages: ranks in this many contiguous groups, layers split between them")
    p.add_argument("--plan", metavar="FILE", help="run this plan: `llmd plan --json` output (or a plan from --json)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--weights", choices=["auto", *PRECISIONS], default="auto",
                   help="weight precision; int8 and int4 are quantised per slice as they load "
                        "(auto: int8 on CPU, bf16 on CUDA)")
    p.add_argument("--context", type=int, help="KV cache length in tokens (default min(2048, the model's))")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / workers)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any rank may wait for another (default 120)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the decode step (auto: on CPU when a C++ compiler is present)")
    p.add_argument("--balance", choices=["off", "on"], default="off",
                   help="move KV groups and MLP columns from slow ranks to fast ones while generating")
    p.add_argument("--balance-threshold", type=float, default=0.10,
                   help="rebalance when a rank's step time is off its stage's mean by more than this (default 0.10)")
    p.add_argument("--balance-every", type=int, default=BalancerConfig.check_every,
                   help=f"decode steps between two checks (default {BalancerConfig.check_every})")
    p.add_argument("--balance-max-groups", type=int, default=1, help="KV groups moved per migration (default 1)")
    p.add_argument("--slowdown", action="append", default=[], metavar="RANK:FACTOR[@STEP]",
                   help="simulate a slow device: stretch RANK's compute time by FACTOR (from forward step STEP)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens even past end-of-text")


def add_network_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="this machine's LAN address to use (default: the default route's)")
    p.add_argument("--secret-file", help="the pool secret (default: $LLMD_POOL_SECRET, else the host's own)")


def build_parser(extensions=()) -> argparse.ArgumentParser:
    """The commands; each of `extensions(sub, add_engine_options, add_network_options)` adds more
    (the web UI's `up` and `host`, from `ui/`, which may import `app/` but not the reverse)."""
    parser = argparse.ArgumentParser(prog="llmd", description="Pool the spare GPUs of an office into one LLM cluster.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text once",
                         description="Generate a reply. Example: llmd generate --workers 2 --chat 'Name three colours.'")
    add_engine_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--dump-logits", metavar="FILE", help="save prefill and decode logits (torch.save) for checks")
    gen.add_argument("--agents", choices=["auto"], help="run on the agents discovered over mDNS, not local workers")
    gen.add_argument("--expect", type=int, default=1, help="with --agents: wait for this many agents (default 1)")
    gen.add_argument("--discover-timeout", type=float, default=15.0, help="with --agents: seconds to wait for them")
    add_network_options(gen)
    gen.add_argument("prompt")

    chat = sub.add_parser("chat", help="chat in the terminal",
                          description="Chat with a model split over local workers. Example: llmd chat --workers 2")
    add_engine_options(chat)
    add_sampling_options(chat)
    chat.add_argument("--system", help="system message")

    agent = sub.add_parser("agent", help="offer this workstation's devices to the pool",
                           description="Run a workstation agent. Example: LLMD_POOL_SECRET=... llmd agent --devices cpu:2")
    agent.add_argument("--name", default=socket.gethostname(), help="name shown to the host (default: hostname)")
    agent.add_argument("--port", type=int, default=0, help="control API port (default: any free one)")
    agent.add_argument("--devices", help="cpu:N to offer N CPU workers (default: every NVIDIA GPU, else cpu:1)")
    agent.add_argument("--threads", type=int, help="torch threads per CPU worker (default: cores / CPU workers)")
    agent.add_argument("--memory-mb", type=int, help="the most RAM its CPU workers may use together (default: all free)")
    agent.add_argument("--cache-max-gb", type=float,
                       help="the most disk the slices it fetches from the host may take; least recently used go "
                            "first (default: no bound)")
    add_network_options(agent)

    plan = sub.add_parser("plan", help="plan how a model splits over devices, with predictions",
                          description="Plan layers across hosts and heads across GPUs. "
                                      "Example: llmd plan --model llama-3.1-70b --device ws1:rtx4090 "
                                      "--device ws1:rtx4090 --weights int4")
    plan.add_argument("--model", default="default", help="a shape preset (e.g. llama-3.1-8b), `default` or a HF dir")
    plan.add_argument("--device", action="append", required=True, metavar="HOST:KIND",
                      help="one per GPU, e.g. ws1:rtx4090 (kinds: rtx4090, rtx3090, a100-80gb, h100, cpu)")
    plan.add_argument("--link", action="append", default=[], metavar="A-B:KIND",
                      help="a link between hosts, e.g. ws1-ws2:10gbe (nvlink, pcie, 10gbe, 1gbe)")
    plan.add_argument("--weights", default="bf16", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    plan.add_argument("--context", type=int, default=8192)
    plan.add_argument("--stages", type=int, help="force this many pipeline stages")
    plan.add_argument("--json", action="store_true")

    peers = sub.add_parser("peers", help="list the agents on the LAN",
                           description="List agents found over mDNS. Example: llmd peers --timeout 3 --json")
    peers.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    peers.add_argument("--json", action="store_true")
    add_network_options(peers)
    add_eval_parser(sub, add_engine_options)
    add_keys_parser(sub)
    for extend in extensions:  # they set `func` on their parsers
        extend(sub, add_engine_options, add_network_options)
    return parser


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="API keys for the OpenAI-compatible API and the web page's login",
                          description="Make, list and revoke API keys. A key is shown once, at creation, and "
                                      "stored hashed. Example: llmd keys create alice")
    actions = keys.add_subparsers(dest="action", required=True)
    for name, text in (("create", "make a key (printed alone on the last line)"), ("list", "list the keys"),
                       ("revoke", "revoke a key: requests with it are refused from now on")):
        action = actions.add_parser(name, help=text)
        if name != "list":
            action.add_argument("name", help="whose key: letters, digits, _.@- (e.g. alice, ci-bot)")
        action.add_argument("--db", help="the SQLite store (default: $LLMD_DB, else llmd.db in the user's data folder)")
        if name == "list":
            action.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_keys)


def cmd_keys(args) -> int:
    from .keys import create_key
    from .store import Store, default_db_path

    with Store(args.db or default_db_path()) as store:
        if args.action == "create":
            key = create_key(store, args.name)
            print(f"API key for {args.name} (shown once; llmd keeps only its hash):", file=sys.stderr)
            print(key)
        elif args.action == "revoke":
            store.revoke_key(args.name)
            print(f"revoked {args.name}")
        elif args.json:
            print(json.dumps(store.keys()))
        else:
            when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
            for r in store.keys():
                state = f"revoked {when(r['revoked'])}" if r["revoked"] else "live"
                print(f"{r['name']:24s} created {when(r['created'])}  {state}")
    return 0


@dataclass
class Setup:
    spec: RankSpec
    world_size: int
    text: TextModel
    balancer: BalancerConfig | None = None


def parse_slowdown(specs: list[str], world_size: int) -> list[list[float]]:
    """["1:2@64"] -> [[1, 2.0, 64]]: rank 1 twice as slow from its 64th forward step."""
    out = []
    for spec in specs:
        try:
            rank, rest = spec.split(":", 1)
            factor, _, step = rest.partition("@")
            triple = [int(rank), float(factor), int(step or 0)]
        except ValueError:
            raise LlmdError(f"--slowdown must be RANK:FACTOR[@STEP], e.g. 1:2@64, got {spec!r}") from None
        if not 0 <= triple[0] < world_size:
            raise LlmdError(f"--slowdown names rank {triple[0]}, but the ranks are 0..{world_size - 1}")
        if not 1 <= triple[1] <= 100 or triple[2] < 0:
            raise LlmdError(f"--slowdown needs a factor from 1 to 100 and a step >= 0, got {spec!r}")
        out.append(triple)
    return out


def balancer_config(args, column_unit: int = 1) -> BalancerConfig | None:
    if args.balance == "off":
        return None
    return BalancerConfig(threshold=args.balance_threshold, check_every=args.balance_every,
                          max_groups=args.balance_max_groups, column_unit=column_unit)


def chosen_weights(args) -> str:
    """`--weights auto`: the fastest precision inside the quality bounds (perplexity within 1% of fp32's),
    as bench/quant.py measures them. On CPU that is int8: about 2x fp32's decode, where int4 runs 1.5-1.9x
    (and eager, 1.5x). On CUDA bf16, until a GPU run measures int8 and int4 there (bench/gpu.py)."""
    if args.weights != "auto":
        return args.weights
    return "bf16" if args.device == "cuda" else "int8"


def prepare(args, world_size: int | None = None) -> Setup:
    """Validate the options and resolve the model before any process starts."""
    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    plan = read_plan_file(args.plan, cfg) if args.plan else None
    if plan and args.workers is not None and args.workers != plan.world_size:
        raise LlmdError(f"--workers {args.workers} but {args.plan} has {plan.world_size} ranks; drop --workers")
    if world_size is None:
        world_size = args.workers if args.workers is not None else (plan.world_size if plan else 1)
    if world_size < 1:
        raise LlmdError("--workers must be at least 1")
    if plan and plan.world_size != world_size:
        raise LlmdError(f"{args.plan} has {plan.world_size} ranks but there are {world_size} (1 here + the agents' devices)")
    if not args.timeout > 0:
        raise LlmdError("--timeout must be a positive number of seconds")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LlmdError("--device cuda but no CUDA GPU is visible to torch")
    weights = chosen_weights(args)
    unit = quant.column_unit(cfg, weights)
    if plan:
        check_plan(plan, cfg, unit)
    plan = plan or make_pipeline_plan(cfg, parse_shares(args.shares, world_size), args.stages, unit)
    limit = min(cfg.max_positions, cfg.sliding_window or cfg.max_positions)
    context = args.context or min(2048, limit)
    if not 1 < context <= limit:
        raise LlmdError(f"--context must be between 2 and {limit} for this model")
    local_ranks = 1 if getattr(args, "agents", None) else world_size  # with agents, only rank 0 runs here
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_ranks)
    balancer = balancer_config(args, unit)
    dtype = str(quant.activation_dtype(weights, args.device)).removeprefix("torch.")
    slots = getattr(args, "slots", None) or 1  # generate and chat run one sequence; up and host say "auto"
    if slots == "auto":  # the ranks on this machine decide (agents' devices are checked to fit by check_fit)
        slots = default_slots(cfg, plan, context, weights, DTYPES[dtype].itemsize,
                              local_free_bytes(args.device, local_ranks))
    options = EngineOptions(plan=plan.to_dict(), device=args.device, dtype=dtype, weights=weights,
                            context=context, slots=slots, timeout_s=args.timeout,
                            compile=want_compile(args), reshardable=balancer is not None,
                            slowdown=tuple(tuple(s) for s in parse_slowdown(args.slowdown, world_size)))
    spec = options.rank_spec(str(model_dir), rank=0, threads=threads)
    return Setup(spec, world_size, TextModel.load(model_dir), balancer)


def local_free_bytes(device: str, ranks: int) -> list[int]:
    """Free memory per rank as this machine sees it: each GPU's, or the RAM shared by the CPU ranks."""
    if device == "cuda":
        import torch

        return [torch.cuda.mem_get_info(i)[0] for i in range(min(ranks, torch.cuda.device_count()))] or [0]
    import psutil

    return [psutil.virtual_memory().available // max(ranks, 1)] * ranks


def read_plan_file(path: str, cfg: ModelConfig) -> Plan:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BadPlan(f"cannot read the plan file {path}: {e.strerror}") from None
    return load_plan(text, cfg, source=path)


def want_compile(args) -> bool:
    if args.compile != "auto":
        return args.compile == "on"
    has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    return args.device == "cpu" and has_cxx


def sampling_params(args, text: TextModel) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop_token_ids=[] if args.ignore_eos else text.stop_token_ids, seed=args.seed)


def host_secret(args) -> str:
    if args.secret_file or os.environ.get("LLMD_POOL_SECRET"):
        return read_secret(args.secret_file)
    return load_or_create_secret()


def start_cluster(args) -> tuple[Setup, Cluster, "Host | None"]:
    """Local workers, or (--agents auto) the agents discovered over mDNS."""
    if not args.agents:
        setup = prepare(args)
        return setup, LocalCluster(setup.spec, setup.world_size, setup.balancer), None
    if args.expect < 1:
        raise LlmdError("--expect must be at least 1")
    address = args.address or primary_address()
    host = Host(host_secret(args), address)
    try:
        found = host.wait_for_peers(args.expect, args.discover_timeout)
        if len(found) < args.expect:
            refused = [s.peer.advert.name for s in host.peers() if s.health == "refused"]
            hint = f"; refused (another pool's secret): {', '.join(refused)}" if refused else ""
            raise NoAgents(f"found {len(found)} agent(s) answering on the LAN within {args.discover_timeout:g} s, "
                           f"expected {args.expect}{hint}")
        chosen = found[: args.expect]
        health = [(s, host.client(s.peer).get("/v1/health")) for s in chosen]
        agents = [(host.client(s.peer), h["devices"]) for s, h in health]
        setup = prepare(args, world_size=1 + sum(len(d) for _, d in agents))
        check_fit(setup, [(s.peer.advert.name, d, f) for s, h in health
                          for d, f in zip(h["devices"], h["device_free_mb"], strict=True)])
        cluster = RemoteCluster(setup.spec, args.model, agents, address, setup.balancer)
        cluster.on_fetch = FetchPrinter()
        return setup, cluster, host
    except BaseException:
        host.close()
        raise


class FetchPrinter:
    """The agents' fetches of their slices on stderr, a line each at most every second."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.last = every_s, 0.0

    def __call__(self, fetches) -> None:
        done = all(f.bytes >= f.total for f in fetches)
        if time.monotonic() - self.last < self.every_s and not done:
            return
        self.last = time.monotonic()
        for f in fetches:
            left = "" if f.left_s is None or f.bytes >= f.total else f", {f.left_s:.0f} s left"
            print(f"llmd: the agent at {f.agent} fetched {f.bytes / 1e6:.1f} of {f.total / 1e6:.1f} MB of its "
                  f"slices, {f.rate / 1e6:.1f} MB/s{left}", file=sys.stderr, flush=True)


def check_fit(setup: Setup, remote_devices: list[tuple[str, str, int]]) -> None:
    """Every agent device (name, device, free MB), in rank order from rank 1, must hold its shard."""
    cfg = ModelConfig.from_hf(load_hf_config(Path(setup.spec.model_dir)))
    plan = Plan.from_dict(setup.spec.plan)
    short = []
    for shard, (name, device, free_mb) in zip(plan.ranks[1:], remote_devices, strict=True):
        need_mb = rank_bytes(cfg, plan, shard.rank, setup.spec.context, setup.spec.slots, setup.spec.weights,
                             DTYPES[setup.spec.dtype].itemsize) / 2**20
        if need_mb > free_mb:
            short.append(f"{name} {device} has {free_mb} MB free, rank {shard.rank} needs {need_mb:.0f} MB")
    if short:
        raise ModelDoesNotFit("the model does not fit the joined devices: " + "; ".join(short)
                              + " (try a smaller --context, more agents, or uneven --shares)")


def cmd_generate(args) -> int:
    setup, cluster, host = start_cluster(args)
    try:
        return generate_on(args, setup, cluster)
    finally:
        if host:
            host.close()


def generate_on(args, setup: Setup, cluster: Cluster) -> int:
    text = setup.text
    params = sampling_params(args, text)
    prompt_ids = text.chat_ids([{"role": "user", "content": args.prompt}]) if args.chat else text.encode(args.prompt)
    cfg = ModelConfig.from_hf(load_hf_config(Path(setup.spec.model_dir)))
    check_prompt(prompt_ids, setup.spec.context, cfg.max_positions)  # before any process starts
    with cluster:
        driver = cluster.driver
        stream = None if args.json else text.streamer(sys.stdout)
        gen = driver.generate(prompt_ids, params, on_token=stream, record_logits=bool(args.dump_logits))
        stats = driver.stats()
        final_plan = driver.plan.to_dict()
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
        "loaded_peak_rss_mb_per_rank": [s["loaded_peak_rss_mb"] for s in stats],
        "rss_before_load_mb_per_rank": [s["rss_before_load_mb"] for s in stats],
        "weights_mb_per_rank": [s["weights_mb"] for s in stats],
        "finish_reason": gen.finish_reason,
        "plan": setup.spec.plan,
        "final_plan": final_plan,
        "migrations": gen.migrations,
        "rank_step_ms": gen.rank_step_ms,
        "decode_step_ms": [round(t, 3) for t in gen.decode_step_ms],
        "fetched": [asdict(f) for f in cluster.fetched()],
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
    with LocalCluster(setup.spec, setup.world_size, setup.balancer) as cluster:
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


def cmd_agent(args) -> int:
    from .agent import run_agent

    if args.cache_max_gb is not None and args.cache_max_gb <= 0:
        raise LlmdError("--cache-max-gb must be more than 0")
    cache_max = int(args.cache_max_gb * 2**30) if args.cache_max_gb else None
    run_agent(args.name, args.address or primary_address(), args.port, read_secret(args.secret_file), args.devices,
              args.threads, args.memory_mb, cache_max)
    return 0


def cmd_peers(args) -> int:
    secret = read_secret(args.secret_file) if (args.secret_file or os.environ.get("LLMD_POOL_SECRET")) else None
    with Host(secret, args.address) as host:
        time.sleep(args.timeout)
        host.refresh()
        rows = [s.to_dict() for s in host.peers()]
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no agents found in {args.timeout:g} s")
    else:
        for r in rows:
            print(f"{r['name']:20} {r['address']}:{r['port']:<6} {r['devices']:28} {r['state']:10} {r['health']}")
    return 0


def model_shape(spec: str) -> ModelConfig:
    """A shape preset by name, else a model's own config."""
    if spec in PRESETS:
        return preset(spec)
    try:
        return ModelConfig.from_hf(load_hf_config(resolve_model(spec)))
    except ModelNotFound as e:
        raise ModelNotFound(f"{e}, or a preset: {', '.join(sorted(PRESETS))}") from None


def cmd_plan(args) -> int:
    devices = [parse_device(d) for d in args.device]
    links = [parse_link(link) for link in args.link]
    p = plan_partition(model_shape(args.model), devices, links, precision=args.weights, context=args.context,
                       force_stages=args.stages)
    print(json.dumps(p.to_dict()) if args.json else describe(p))
    return 0


def main(argv=None, extensions=()) -> int:
    args = build_parser(extensions).parse_args(argv)
    commands = {"generate": cmd_generate, "chat": cmd_chat, "agent": cmd_agent, "peers": cmd_peers, "plan": cmd_plan}
    try:
        return (getattr(args, "func", None) or commands[args.command])(args)
    except LlmdError as e:
        print(f"llmd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
