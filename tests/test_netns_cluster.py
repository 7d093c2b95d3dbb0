"""Real separate hosts: two agents and a host in three network namespaces on one bridge.

The host finds the agents by real multicast mDNS and runs one engine across them
over the namespaces' own addresses (198.18.0.0/15); the tokens must equal the
unsharded transformers model's. Each namespace holds a second address too, on which
nothing of the pool may listen.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from agents import CLI, generate_json, host_env, new_secret, start_agent
from netns import Lan, ip, requires_netns, stop, wait_for_output
from reference import hf_greedy

PROBE = """import json, socket, sys
out = []
for address, port in json.loads(sys.argv[1]):
    with socket.socket() as s:
        s.settimeout(3)
        out.append(s.connect_ex((address, port)) == 0)
print(json.dumps(out))"""


def second_address(lan: Lan, index: int) -> str:
    """An address in another /24 of 198.18.0.0/15 on the same interface: "another interface" of the host."""
    first, second, third, _ = lan.hosts[index].address.split(".")
    return f"{first}.{37 - int(second)}.{third}.{index + 1}"


def tcp_listeners(host) -> list[tuple[str, int]]:
    rows = host.check_output(["ss", "-Hltn"]).split()
    local = [col for col in rows if col.count(":") >= 1 and col.rsplit(":", 1)[1].isdigit()]
    # `ss` prints local then peer (`*:*` / `0.0.0.0:*`) per row: the local ones have a numeric port.
    return [(a.rsplit(":", 1)[0].strip("[]"), int(a.rsplit(":", 1)[1])) for a in local]


def reachable(prober, targets: list[tuple[str, int]]) -> list[bool]:
    return json.loads(prober.check_output([sys.executable, "-c", PROBE, json.dumps(targets)]))


@pytest.mark.slow
@requires_netns
def test_host_discovers_agents_in_other_namespaces_and_generates(default_model_dir):
    secret = new_secret()
    with Lan(3) as lan:
        host, *workstations = lan.hosts
        for i, h in enumerate(lan.hosts):
            ip("-n", h.name, "addr", "add", f"{second_address(lan, i)}/24", "dev", h.iface)
        agents = []
        try:
            def start(i):
                ws = workstations[i]
                agents.append(start_agent(f"ns-ws{i}", secret, address=ws.address, run_in=ws.run_in))

            with ThreadPoolExecutor(len(workstations)) as starting:  # each takes seconds to listen: at once
                list(starting.map(start, range(len(workstations))))
            # `generate --agents auto` finds them over multicast, at the addresses they advertise
            # (`llmd peers` is tested on loopback, test_agents.py).
            out, _ = generate_json(host.run_in, secret, "--agents", "auto", "--expect", "2", "--address",
                                   host.address, "--threads", "1", "--compile", "off", "--weights", "fp32", "--greedy",
                                   "--chat", "--max-new-tokens", "10", "--json", "Name a colour of the rainbow.")
            assert out["plan"]["world_size"] == 3
            assert out["token_ids"] == hf_greedy(default_model_dir, out["prompt_token_ids"], 10)
            only_on_the_chosen_addresses(lan, secret, agents)
        finally:
            stop(*[a.proc for a in agents])


def only_on_the_chosen_addresses(lan: Lan, secret: str, agents) -> None:
    """While an engine generates, every TCP socket listening in each namespace (agents, gloo, anything) is
    bound to that namespace's chosen address, and none answers on its second address, probed from the
    namespace next to it. (gloo's own listeners are not probed on the chosen address: a stranger's
    connection there is what the threat model says stays possible.)"""
    host = lan.hosts[0]
    proc = host.run_in([*CLI, "generate", "--agents", "auto", "--expect", "2", "--address", host.address,
                        "--threads", "1", "--compile", "off", "--ignore-eos", "--max-new-tokens", "100000",
                        "Once upon a time"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=host_env(secret))
    try:
        wait_for_output(proc, r"\S", timeout=180)  # tokens stream: every rank has joined
        for i, h in enumerate(lan.hosts):
            listeners = tcp_listeners(h)
            assert listeners and {a for a, _ in listeners} == {h.address}, (h.name, listeners)
            prober = lan.hosts[(i + 1) % len(lan.hosts)]
            ports = sorted({p for _, p in listeners})
            assert not any(reachable(prober, [(second_address(lan, i), p) for p in ports])), (h.name, ports)
        assert all(reachable(lan.hosts[0], [(a.address, a.port) for a in agents]))  # the probe can see
        assert proc.poll() is None
    finally:
        stop(proc)
