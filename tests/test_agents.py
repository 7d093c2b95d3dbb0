"""Agents on loopback: real zeroconf discovery, signed control requests, and an engine across them."""

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agents import CLI, host_env, new_secret, parse_json_line, start_agent
from conftest import llmd_here
from llmd.app.discovery import open_zeroconf
from llmd.app.host import Host
from netns import stop, wait_for_output
from reference import hf_greedy

PROMPT = "What is the capital of France?"


@pytest.fixture
def pool():
    """A fresh pool secret and a way to start agents in it; every agent is stopped afterwards."""
    secret, started = new_secret(), []

    def start(name, secret_override=None, **kw):
        started.append(start_agent(name, secret_override or secret, **kw))
        return started[-1]

    yield secret, start
    stop(*[a.proc for a in started])


def run_cli(*args, secret):
    """The host side's CLI code, run in this process with the pool secret in its environment (restored
    after the test); the agents are processes of their own. test_netns_cluster.py runs the command."""
    os.environ["LLMD_POOL_SECRET"] = secret
    return llmd_here(*args)


@pytest.mark.slow
def test_generation_across_agents_matches_transformers_until_one_is_lost(pool, default_model_dir):
    """Two agents hold ranks 1 and 2 beside the host's driver: the tokens are transformers' own. Then one
    agent is killed while a long generation streams: the command ends with a clear error."""
    secret, start = pool
    with ThreadPoolExecutor(2) as starting:  # each agent takes seconds to import and listen: at once
        _, doomed = list(starting.map(start, ["ws0", "doomed"]))
    peers = parse_json_line(run_cli("peers", "--address", "127.0.0.1", "--timeout", "3", "--json",
                                    secret=secret).stdout)
    mine = [p for p in peers if p["health"] == "ok"]
    assert sorted(p["name"] for p in mine) == ["doomed", "ws0"]
    assert all({"name", "address", "port", "devices"} <= p.keys() for p in mine)

    run = run_cli("generate", "--agents", "auto", "--expect", "2", "--address", "127.0.0.1", "--threads", "1",
                  "--weights", "fp32",
                  "--compile", "off", "--greedy", "--chat", "--max-new-tokens", "12", "--json", PROMPT, secret=secret)
    assert run.returncode == 0, run.stderr
    out = parse_json_line(run.stdout)
    assert out["plan"]["world_size"] == 3  # the host's driver holds rank 0, the agents ranks 1 and 2
    assert out["token_ids"] == hf_greedy(default_model_dir, out["prompt_token_ids"], 12)
    assert out["fetched"] == []  # local files win: the agents have the bundled model, so they fetch nothing

    proc = subprocess.Popen([*CLI, "generate", "--agents", "auto", "--expect", "2", "--address", "127.0.0.1",
                             "--threads", "1", "--compile", "off", "--greedy", "--ignore-eos", "--max-new-tokens", "1500",
                             "Once upon"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=host_env(secret))
    try:
        wait_for_output(proc, r"\S", timeout=180)  # text is streaming
        doomed.proc.kill()  # the agent and, with it, its worker
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode not in (0, None)
    err = stderr.decode()
    assert "llmd: error:" in err and "Traceback" not in err
    assert "worker" in err or "agent" in err


def test_an_agent_of_another_pool_is_listed_but_cannot_be_joined(pool):
    secret, start = pool
    start("stranger", secret_override=new_secret())
    peers = parse_json_line(run_cli("peers", "--address", "127.0.0.1", "--timeout", "3", "--json",
                                    secret=secret).stdout)
    stranger = [p for p in peers if p["name"] == "stranger"]
    assert stranger and stranger[0]["health"] == "refused"
    with Host(secret, "127.0.0.1") as host:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [s for s in host.peers() if s.health == "refused"]:
            host.refresh()
            time.sleep(0.2)
        with pytest.raises(Exception, match="another pool"):
            host.join("stranger")
    run = run_cli("generate", "--agents", "auto", "--expect", "1", "--address", "127.0.0.1",
                  "--discover-timeout", "4", "--max-new-tokens", "4", "hi", secret=secret)
    assert run.returncode != 0
    assert "llmd: error:" in run.stderr and "stranger" in run.stderr and "Traceback" not in run.stderr


def test_agent_shutdown_removes_its_record_and_the_host_marks_it_lost(pool):
    secret, start = pool
    agent = start("leaving")
    with Host(secret, "127.0.0.1") as host:
        assert [s.peer.advert.name for s in host.wait_for_peers(1, timeout_s=10)] == ["leaving"]
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            host.refresh()
            status = [s for s in host.peers() if s.peer.advert.name == "leaving"]
            if status and status[0].health == "lost":
                break
            time.sleep(0.2)
        assert status and status[0].health == "lost"
    # And a fresh browser no longer finds it at all.
    zc = open_zeroconf("127.0.0.1")
    try:
        from llmd.app.discovery import Browser

        browser = Browser(zc)
        time.sleep(2)
        assert not [p for p in browser.snapshot() if p.advert.name == "leaving"]
        browser.close()
    finally:
        zc.close()


def test_no_agents_is_a_clear_error(pool):
    secret, _ = pool
    run = run_cli("generate", "--agents", "auto", "--expect", "2", "--address", "127.0.0.1",
                  "--discover-timeout", "2", "hi", secret=secret)
    assert run.returncode != 0
    assert "llmd: error: found 0 agent(s)" in run.stderr and "Traceback" not in run.stderr


def test_a_model_that_does_not_fit_names_the_short_device(pool):
    secret, start = pool
    start("small", extra=("--memory-mb", "50"))
    run = run_cli("generate", "--agents", "auto", "--expect", "1", "--address", "127.0.0.1", "--max-new-tokens", "4",
                  "hi", secret=secret)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "does not fit" in run.stderr and "small cpu has 50 MB free, rank 1 needs" in run.stderr


def test_join_and_drop_a_peer(pool):
    secret, start = pool
    start("friend")
    with Host(secret, "127.0.0.1") as host:
        assert [s.peer.advert.name for s in host.wait_for_peers(1, timeout_s=10)] == ["friend"]
        assert host.join("friend").joined
        assert [s.peer.advert.name for s in host.peers() if s.joined] == ["friend"]
        assert not host.drop("friend").joined
        with pytest.raises(Exception, match="no agent named 'nobody'"):
            host.join("nobody")
