"""Slices fetched from the host against curl fetching the same bytes, side by side in one run.

Two network namespaces on one bridge (tests/netns.py, needs root): the host's namespace serves a
checkpoint of random bfloat16 tensors twice, through llmd's model server (signed, app/models.py) and
through a plain HTTP file server. From the other namespace, in turns: `curl` saves the weight file,
then an agent's reader (app/model_cache.py) fetches every tensor of it into an empty cache, its
chunks several in flight, each signed, checked and written. Medians of the rates, and their ratio.

    python bench/transfer.py [--mb 512] [--rounds 3]
"""

import argparse
import http.server
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TENSOR_MB = 32


def make_checkpoint(out: Path, mb: int) -> None:
    import torch
    from safetensors.torch import save_file

    rows = TENSOR_MB * 2**20 // (2 * 4096)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, 4096, dtype=torch.bfloat16)
               for i in range(max(1, mb // TENSOR_MB))}
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "note": "random tensors for bench/transfer.py"}))


def serve(model_dir: str, address: str) -> None:
    """In the host's namespace: both servers, until stdin closes."""
    import threading
    from dataclasses import asdict
    from functools import partial

    from llmd.app.models import ModelServer

    models = ModelServer(address, os.environ["LLMD_POOL_SECRET"])
    source = models.offer(Path(model_dir))
    handler = partial(QuietHandler, directory=model_dir)
    files = http.server.ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    print(json.dumps({"source": asdict(source), "url": f"http://{address}:{files.server_address[1]}/model.safetensors"}),
          flush=True)
    sys.stdin.read()
    files.shutdown()
    models.close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def fetch(source_json: str, url: str, rounds: int, chunk_mb: float | None, in_flight: int | None) -> None:
    """In the agent's namespace: curl, then the reader, `rounds` times each, in turns."""
    from llmd.app import model_cache
    from llmd.app.model_cache import HostClient, open_fetched, prepare
    from llmd.app.models import Source
    from llmd.engine.sharding import Read

    if chunk_mb:
        model_cache.CHUNK_BYTES = int(chunk_mb * 2**20)
    if in_flight:
        model_cache.IN_FLIGHT = in_flight
    source, secret = Source(**json.loads(source_json)), os.environ["LLMD_POOL_SECRET"]
    results = {"curl": [], "llmd": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            subprocess.run(["curl", "-sSf", "-o", f"{tmp}/weights", url], check=True)
            spent = time.perf_counter() - t
            results["curl"].append(Path(f"{tmp}/weights").stat().st_size / spent)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["LLMD_CACHE_DIR"] = tmp
            local = prepare(source, HostClient(source, secret))
            reader = open_fetched(local, source, secret)
            wants = reader.wants([Read(name, None) for name in reader.manifest.tensors])
            t = time.perf_counter()
            reader.fetch(wants)
            spent = time.perf_counter() - t
            results["llmd"].append(sum(w.nbytes for w in wants) / spent)
    results["chunk_bytes"], results["in_flight"] = model_cache.CHUNK_BYTES, model_cache.IN_FLIGHT
    print(json.dumps(results), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the checkpoint (default 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-mb", type=float, help="chunk size to try (default: app/model_cache.py's)")
    parser.add_argument("--in-flight", type=int, help="chunks in flight to try (default: app/model_cache.py's)")
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--fetch", nargs=2, metavar=("SOURCE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(*args.serve)
    if args.fetch:
        return fetch(*args.fetch, args.rounds, args.chunk_mb, args.in_flight)

    from netns import Lan, stop, wait_for_output

    env = dict(os.environ, LLMD_POOL_SECRET=secrets.token_hex(32), PYTHONUNBUFFERED="1")
    model_dir = Path(tempfile.mkdtemp(prefix="llmd-transfer-"))
    try:
        make_checkpoint(model_dir, args.mb)
        size = (model_dir / "model.safetensors").stat().st_size
        with Lan(2) as lan:
            host, agent = lan.hosts
            server = host.run_in([sys.executable, "-u", __file__, "--serve", str(model_dir), host.address],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            try:
                line = wait_for_output(server, r"^\{.*\}$", timeout=120).group(0)
                served = json.loads(line)
                tune = [*(["--chunk-mb", str(args.chunk_mb)] if args.chunk_mb else []),
                        *(["--in-flight", str(args.in_flight)] if args.in_flight else [])]
                out = agent.check_output([sys.executable, __file__, "--rounds", str(args.rounds), *tune, "--fetch",
                                          json.dumps(served["source"]), served["url"]], timeout=1800, env=env)
            finally:
                stop(server)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    results = json.loads(out.strip().splitlines()[-1])
    curl, llmd = statistics.median(results["curl"]), statistics.median(results["llmd"])
    print(f"{size / 1e6:.0f} MB between two network namespaces, {args.rounds} rounds in turns, medians "
          f"(chunks of {results['chunk_bytes'] >> 20} MiB, {results['in_flight']} in flight):")
    print(f"  curl, the whole file:        {curl / 1e6:8.1f} MB/s   {[round(r / 1e6) for r in results['curl']]}")
    print(f"  llmd, every slice of it:     {llmd / 1e6:8.1f} MB/s   {[round(r / 1e6) for r in results['llmd']]}")
    print(f"  ratio llmd / curl:           {llmd / curl:8.2f}   (bar: >= 0.50)")


if __name__ == "__main__":
    main()
