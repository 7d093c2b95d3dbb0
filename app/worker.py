"""A worker rank's process: `python -m llmd.app.worker --spec JSON --rendezvous URL --launch ID`,
started by the driver (local workers) or by an agent, with the rendezvous key in $LLMD_RENDEZVOUS_KEY."""

import argparse
import os
import sys
from pathlib import Path

from llmd.engine.checkpoint import SliceReader
from llmd.engine.plan import Plan
from llmd.engine.worker import RankSpec, exit_with_parent, run_worker, spec_from_json

from .model_cache import CACHE_MAX_ENV, PROGRESS_ENV, SOURCE_ENV, dense_kind, fetch_for, open_fetched, source_from_env
from .rendezvous import KEY_ENV, RemoteTable, TableStore


def slices_reader(spec: RankSpec, key: str):
    """Where the rank reads its slices: the model's files, or (when its agent lacks them) the agent's cache,
    first filled with everything the rank's shard needs from the host."""
    source = os.environ.pop(SOURCE_ENV, "")
    if not source:
        return SliceReader
    max_bytes = int(os.environ.pop(CACHE_MAX_ENV, "0")) or None
    reader = open_fetched(Path(spec.model_dir), source_from_env(source), key, max_bytes, dense_kind(spec.dtype))
    fetch_for(reader, [spec.rank], Plan.from_dict(spec.plan), spec.weights, f"llmd worker rank {spec.rank}",
              os.environ.pop(PROGRESS_ENV, None))
    return lambda model_dir: reader


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="llmd engine worker (started by the driver or an agent)")
    parser.add_argument("--spec", required=True, help="RankSpec as JSON")
    parser.add_argument("--rendezvous", required=True, help="http://ADDR:PORT of the launch's rendezvous")
    parser.add_argument("--launch", required=True, help="the launch's id, which its rendezvous answers to")
    args = parser.parse_args(argv)
    key = os.environ.pop(KEY_ENV, "")  # not passed on to anything this process starts
    spec = spec_from_json(args.spec)
    if not key:
        print(f"llmd worker rank {spec.rank}: no rendezvous key in ${KEY_ENV}", file=sys.stderr, flush=True)
        return 2
    exit_with_parent()
    try:
        open_reader = slices_reader(spec, key)
    except Exception as e:  # its last line is what the driver shows
        print(f"llmd worker rank {spec.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    table = RemoteTable(args.rendezvous, key, args.launch, timeout_s=min(spec.timeout_s, 60.0))
    return run_worker(spec, lambda: TableStore(table, spec.timeout_s), open_reader)


if __name__ == "__main__":
    sys.exit(main())
