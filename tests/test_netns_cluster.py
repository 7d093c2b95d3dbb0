"""Real separate hosts: two agents and a host in three network namespaces on one bridge.

The host finds the agents by real multicast mDNS and runs one engine across them
over the namespaces' own addresses (198.18.0.0/15); the tokens must equal the
unsharded transformers model's.
"""

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from agents import CLI, host_env, new_secret, parse_json_line, start_agent
from netns import Lan, requires_netns, stop
from reference import hf_greedy


@pytest.mark.slow
@requires_netns
def test_host_discovers_agents_in_other_namespaces_and_generates(default_model_dir):
    secret = new_secret()
    with Lan(3) as lan:
        host, *workstations = lan.hosts
        agents = []
        try:
            def start(i):
                ws = workstations[i]
                agents.append(start_agent(f"ns-ws{i}", secret, address=ws.address, run_in=ws.run_in))

            with ThreadPoolExecutor(len(workstations)) as starting:  # each takes seconds to listen: at once
                list(starting.map(start, range(len(workstations))))
            peers = parse_json_line(host.check_output(
                [*CLI, "peers", "--address", host.address, "--timeout", "3", "--json"], env=host_env(secret)))
            assert sorted((p["name"], p["address"]) for p in peers) == sorted(
                (a.name, a.address) for a in agents)
            assert all(p["health"] == "ok" for p in peers)

            proc = host.run_in([*CLI, "generate", "--agents", "auto", "--expect", "2", "--address", host.address,
                                "--threads", "1", "--compile", "off", "--greedy", "--chat", "--max-new-tokens", "10", "--json",
                                "Name a colour of the rainbow."],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=host_env(secret))
            try:
                stdout, stderr = proc.communicate(timeout=300)
            finally:
                stop(proc)
            assert proc.returncode == 0, stderr
            out = parse_json_line(stdout)
            assert out["plan"]["world_size"] == 3
            assert out["token_ids"] == hf_greedy(default_model_dir, out["prompt_token_ids"], 10)
        finally:
            stop(*[a.proc for a in agents])
