"""Start real `llmd agent` processes for tests."""

import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass

from netns import stop, wait_for_output

CLI = [sys.executable, "-u", "-m", "llmd"]


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen
    address: str
    port: int
    agent_id: str


def new_secret() -> str:
    return secrets.token_hex(16)


def start_agent(name: str, secret: str, address: str = "127.0.0.1", devices: str = "cpu:1",
                run_in=None, extra: tuple[str, ...] = ()) -> Agent:
    """One agent; `run_in` (a netns Host's method) starts it inside a namespace."""
    argv = [*CLI, "agent", "--name", name, "--address", address, "--devices", devices, "--threads", "1", *extra]
    env = dict(os.environ, LLMD_POOL_SECRET=secret)
    popen = run_in or (lambda a, **kw: subprocess.Popen(a, **kw))
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        m = wait_for_output(proc, r"listening on ([\d.]+):(\d+).*\(agent id ([0-9a-f]+)\)", timeout=60)
    except BaseException:
        stop(proc)
        raise
    return Agent(name, proc, m.group(1), int(m.group(2)), m.group(3))


def host_env(secret: str) -> dict:
    return dict(os.environ, LLMD_POOL_SECRET=secret)


def parse_json_line(text: str) -> dict:
    import json

    lines = [line for line in text.splitlines() if re.match(r"^[\[{]", line)]
    assert lines, text
    return json.loads(lines[-1])


def generate_json(run_in, secret: str, *args: str, timeout: float = 300) -> tuple[dict, str]:
    """`llmd generate ARGS` (with --json among them) started through `run_in` (a netns Host's method): its
    JSON line and its stderr; a non-zero exit fails the test with that stderr."""
    proc = run_in([*CLI, "generate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  env=host_env(secret))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    assert proc.returncode == 0, stderr
    return parse_json_line(stdout), stderr
