"""A worker rank's process: `python -m llmd.app.worker --spec JSON --rendezvous URL --launch ID`,
started by the driver (local workers) or by an agent, with the rendezvous key in $LLMD_RENDEZVOUS_KEY."""

import argparse
import os
import sys

from llmd.engine.worker import exit_with_parent, run_worker, spec_from_json

from .rendezvous import KEY_ENV, RemoteTable, TableStore


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
    table = RemoteTable(args.rendezvous, key, args.launch, timeout_s=min(spec.timeout_s, 60.0))
    return run_worker(spec, lambda: TableStore(table, spec.timeout_s))


if __name__ == "__main__":
    sys.exit(main())
