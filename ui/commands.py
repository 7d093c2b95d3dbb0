"""`llmd up` and `llmd host`: the host with its web UI (issue 6).

`up` is the one-machine pool: the web UI, an agent advertising this machine, and the bundled
model split over local workers. `host` serves the same UI for an office: agents are joined in
the Cluster tab (or the first `--expect N` that answer) and the engine launches on them.

They live in `ui/` because they assemble the web app over the pool (`ui -> app`); the
console script (`llmd/__main__.py`) adds them to `app/cli.py`'s commands, so `app/` never
imports `ui/`.
"""

import argparse
import copy
import os
import signal
import socket
import threading
import time
from pathlib import Path

from llmd.app import cli, inventory
from llmd.app.agent import QuietServer
from llmd.app.guard import bound_socket, server_config
from llmd.app.server import build_site
from llmd.app.net import primary_address
from llmd.app.pool import Pool, PoolConfig, Recipe
from llmd.app.store import Store, default_db_path
from llmd.engine.errors import LlmdError
from llmd.engine.memory import MAX_DEFAULT_SLOTS

DEFAULT_PORT = 7860
LOGIN_MESSAGE = "Log in with an API key: its name as the user, the key as the password (llmd keys create NAME)."


def add_up_commands(sub, add_engine_options, add_network_options) -> None:
    """Register `up` and `host` on the CLI's subparsers, each with `set_defaults(func=...)`."""
    up = sub.add_parser("up", help="start the web UI, an agent and the default model on this machine",
                        description="Start the host with its web UI, an agent advertising this machine and the "
                                    "model split over local workers, then print the URL. "
                                    "Example: llmd up --port 7860")
    add_engine_options(up)
    _retune(up, "workers", None, "ranks on this machine (default: one per NVIDIA GPU, else 2 CPU workers)")
    _retune(up, "device", None, "cpu or cuda (default: cuda where torch sees a GPU, else cpu)")
    add_web_options(up)
    add_network_options(up)
    up.set_defaults(func=cmd_up)

    host = sub.add_parser("host", help="serve the web UI and run the pool over joined agents",
                          description="Serve the web UI; join agents in its Cluster tab and launch the model "
                                      "on them. Example: llmd host --port 7860 --expect 2")
    add_engine_options(host)
    _retune(host, "workers", None, argparse.SUPPRESS)  # the joined agents' devices decide
    host.add_argument("--expect", type=int, default=0,
                      help="join the first N agents that answer and launch on them at start (default: wait for "
                           "the Cluster tab)")
    host.add_argument("--discover-timeout", type=float, default=60.0,
                      help="with --expect: seconds to wait for the agents (default 60)")
    add_web_options(host)
    add_network_options(host)
    host.set_defaults(func=cmd_host)


def _retune(parser: argparse.ArgumentParser, dest: str, default, help_text: str) -> None:
    """Give a shared option another default and help in this command."""
    for action in parser._actions:
        if action.dest == dest:
            action.default, action.help = default, help_text


def add_web_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"web UI port (default {DEFAULT_PORT}; 0: any free)")
    p.add_argument("--listen", action="store_true",
                   help="serve the UI to the LAN on --address too; by default only this machine can open it")
    p.add_argument("--models-dir", help="a folder of models (Hugging Face folders, GGUF files, or a Hugging Face "
                                        "cache) the Chat tab offers to switch to")
    p.add_argument("--db", help="the SQLite store (default: $LLMD_DB, else llmd.db in the user's data folder)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the chat's default reply length (default 256)")
    p.add_argument("--slots", type=slots_arg, default="auto",
                   help="sequences generated at once, each with its own KV cache slot (default: up to "
                        f"{MAX_DEFAULT_SLOTS}, as many as half the free memory holds)")
    p.add_argument("--max-waiting", type=int, default=32,
                   help="requests that may wait for a slot before new ones are answered 'busy' (default 32)")


def slots_arg(text: str):
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--slots must be at least 1")
    return value


def cmd_up(args) -> int:
    gpus = len(inventory.read_inventory().gpus)
    args.device = args.device or ("cuda" if gpus and _torch_cuda() else "cpu")
    if args.workers is None and not args.plan:  # a plan file says how many ranks it has
        args.workers = gpus if args.device == "cuda" else 2
    return serve(args, local=True)


def cmd_host(args) -> int:
    if args.expect < 0:
        raise LlmdError("--expect must be 0 or more")
    return serve(args, local=False)


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def recipe_for(args, local: bool) -> Recipe:
    def prepare(world_size: int | None, remote: bool, model: str):
        chosen = copy.copy(args)
        chosen.agents, chosen.model = ("auto" if remote else None), model
        return cli.prepare(chosen, world_size)

    return Recipe(model=args.model, prepare=prepare, check_fit=cli.check_fit, local=local,
                  local_workers=args.workers if local else None, models_dir=args.models_dir)


def bind(address: str, port: int) -> socket.socket:
    try:
        return bound_socket(address, port)
    except OSError as e:
        raise LlmdError(f"cannot serve the web UI on {address}:{port}: {e.strerror} (pass --port 0 for any free port)")


def serve(args, local: bool) -> int:
    if args.max_new_tokens < 1:
        raise LlmdError("--max-new-tokens must be at least 1")
    if args.max_waiting < 0:
        raise LlmdError("--max-waiting must be 0 or more")
    if args.models_dir and not Path(args.models_dir).expanduser().is_dir():
        raise LlmdError(f"--models-dir {args.models_dir} is not a folder")
    address = args.address or primary_address()
    config = PoolConfig(node=socket.gethostname(), address=address, secret=cli.host_secret(args),
                        recipe=recipe_for(args, local), max_waiting=args.max_waiting)
    store = Store(args.db or default_db_path())
    pool = Pool(store, config)
    sock = None
    try:
        sock = bind(address if args.listen else "127.0.0.1", args.port)
        pool.start(local_agent=local)
        if local:
            pool.launch_local()
        elif args.expect:
            pool.expect_agents(args.expect, args.discover_timeout)
        run_web(args, pool, sock, address)
    finally:
        pool.close()
        store.close()
        if sock is not None:
            sock.close()
    return 0


def run_web(args, pool: Pool, sock: socket.socket, address: str) -> None:
    """Serve the UI until SIGINT/SIGTERM; print the URL and the admin link once the page is served."""
    from .admin import Admin

    port = sock.getsockname()[1]
    admin = Admin()
    site = make_site(pool, admin, port, address, args.listen, args.max_new_tokens)
    server = QuietServer(server_config(site, timeout_graceful_shutdown=3))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    url = f"http://{address if args.listen else '127.0.0.1'}:{port}"
    threading.Thread(target=announce, args=(server, url, admin.link(url)), daemon=True).start()
    server.run(sockets=[sock])  # returns on SIGINT/SIGTERM


def make_site(pool: Pool, admin, port: int, address: str, listen: bool, max_new_tokens: int):
    """The page and the API on one app (app/server.py), the page asking for a login when `listen`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # an office LAN may have no internet
    import gradio as gr
    from fastapi import FastAPI

    from .admin import add_login
    from .app import UiOptions, create_ui

    blocks = create_ui(pool, admin, UiOptions(max_new_tokens=max_new_tokens))

    def mount(app: FastAPI) -> FastAPI:
        add_login(app, admin)
        # Beyond loopback the page asks for a login: an API key's name and the key (`llmd keys create`).
        login = {"auth": pool.login, "auth_message": LOGIN_MESSAGE} if listen else {}
        return gr.mount_gradio_app(app, blocks, path="/", **login)

    return build_site(pool, port, listen, address, mount)


def announce(server, url: str, admin_link: str) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        print(f"llmd: UI at {url}", flush=True)
        print(f"llmd: OpenAI-compatible API at {url}/v1", flush=True)
        print(f"llmd: admin link (reveal the secret, join, drop, relaunch, prices): {admin_link}", flush=True)
