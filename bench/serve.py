"""Serving throughput and latency: the host on loopback, 1, 4 and 8 concurrent streaming clients.

Starts `llmd up` on 127.0.0.1 with the bundled model on --workers CPU workers, waits for the
model to load, warms every batch size up with one round at the largest client count, then
measures each concurrency level in turns (1, 4, 8, 1, 4, 8, ... for --rounds rounds, so a
noisy moment hits every level alike). Each client is a thread with the official `openai`
client asking for a long reply (greedy, --tokens at most, streamed with usage).

Per level, the median over rounds of: aggregate tokens/s (completion tokens of all clients,
from the final usage chunk, over the wall time from the first request sent to the last one
finished), time to first token p50/p95 (send to first content chunk) and inter-token latency
p50/p95 (gaps between successive content chunks, pooled over all streams). Prints the ratio of
aggregate tokens/s at the largest client count to one client (the aim is >= 4x at 8).

    .venv/bin/python bench/serve.py [--workers 2] [--clients 1 4 8] [--tokens 128] [--rounds 2]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from openai import OpenAI

TOPICS = ["a lighthouse keeper", "a dragon who collects teacups", "a lost robot", "a desert caravan",
          "a city under the sea", "a clockmaker's apprentice", "a train that never stops", "a talking fox"]


@dataclass
class Stream:
    tokens: int
    ttft: float
    gaps: list[float]
    end: float


@dataclass
class Level:
    clients: int
    tokens_per_s: list[float] = field(default_factory=list)
    ttft: list[tuple[float, float]] = field(default_factory=list)
    itl: list[tuple[float, float]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_model(base: str, proc: subprocess.Popen, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmd up exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                data = json.load(r).get("data") or []
            if data:
                return data[0]["id"]
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the model did not load in {timeout:.0f} s")


def stream(client: OpenAI, model: str, topic: str, tokens: int) -> Stream:
    start = time.perf_counter()
    times, used = [], None
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Write a long, detailed story about {topic}."}],
        max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            used = chunk.usage.completion_tokens
    end = time.perf_counter()
    if not times:
        raise RuntimeError("a stream carried no content")
    return Stream(tokens=used if used is not None else len(times), ttft=times[0] - start,
                  gaps=[b - a for a, b in zip(times, times[1:])], end=end)


def p50_p95(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=20, method="inclusive")
    return statistics.median(values), q[18]


def run_level(clients: list[OpenAI], model: str, n: int, tokens: int) -> tuple[float, list[Stream]]:
    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        futures = [pool.submit(stream, clients[i], model, TOPICS[i % len(TOPICS)], tokens) for i in range(n)]
        streams = [f.result() for f in futures]
    wall = max(s.end for s in streams) - start
    return sum(s.tokens for s in streams) / wall, streams


def start_host(args, tmp: str) -> tuple[subprocess.Popen, int]:
    port = args.port or free_port()
    db = os.path.join(tmp, "llmd.db")
    env = {**os.environ, "LLMD_DB": db, "XDG_DATA_HOME": tmp}
    cmd = [sys.executable, "-m", "llmd", "up", "--port", str(port), "--workers", str(args.workers),
           "--slots", str(max(args.clients)), "--db", db]
    if args.weights:
        cmd += ["--weights", args.weights]
    log = open(os.path.join(tmp, "host.log"), "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), port


def stop_host(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per request (default 128)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--weights", help="weight precision (default: the server's own)")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmd-bench-") as tmp:
        proc, port = start_host(args, tmp)
        try:
            base = f"http://127.0.0.1:{port}/v1"
            t = time.perf_counter()
            model = wait_for_model(base, proc)
            print(f"host up on {base}, model {model} loaded in {time.perf_counter() - t:.0f} s", flush=True)
            clients = [OpenAI(base_url=base, api_key="none", timeout=600, max_retries=0)
                       for _ in range(max(args.clients))]
            for n in sorted({1, max(args.clients)}):  # warm-up: compile the batch sizes before measuring
                run_level(clients, model, n, args.tokens)
            levels = {n: Level(n) for n in args.clients}
            for r in range(args.rounds):
                for n in args.clients:
                    rate, streams = run_level(clients, model, n, args.tokens)
                    lv = levels[n]
                    lv.tokens_per_s.append(rate)
                    lv.ttft.append(p50_p95([s.ttft for s in streams]))
                    lv.itl.append(p50_p95([g for s in streams for g in s.gaps]))
                    lv.tokens.append(sum(s.tokens for s in streams))
                print(f"round {r + 1}: " + ", ".join(f"{n} clients {lv.tokens_per_s[-1]:.1f} tok/s"
                                                     for n, lv in levels.items()), flush=True)
        except BaseException:
            stop_host(proc)
            sys.stdout.write(open(os.path.join(tmp, "host.log")).read()[-3000:])
            raise
        stop_host(proc)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\nbundled model, {args.workers} workers, {args.tokens} tokens per request, "
          f"median of {args.rounds} rounds")
    print("clients  agg tok/s  ttft p50 ms  ttft p95 ms  itl p50 ms  itl p95 ms  tokens")
    for n, lv in levels.items():
        print(f"{n:7d}  {med(lv.tokens_per_s):9.1f}  {med(t[0] for t in lv.ttft) * 1e3:11.1f}  "
              f"{med(t[1] for t in lv.ttft) * 1e3:11.1f}  {med(t[0] for t in lv.itl) * 1e3:10.1f}  "
              f"{med(t[1] for t in lv.itl) * 1e3:10.1f}  {med(lv.tokens):6.0f}")
    lo, hi = min(args.clients), max(args.clients)
    ratio = med(levels[hi].tokens_per_s) / med(levels[lo].tokens_per_s)
    print(f"{hi} clients / {lo} client aggregate tokens/s: {ratio:.2f}x (aim >= 4x)")


if __name__ == "__main__":
    main()
