"""Agents on loopback: real zeroconf discovery, signed control requests, and an engine across them."""

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agents import CLI, host_env, new_secret, parse_json_line, start_agent
from conftest import llmd_here
from llmd.app.discovery import open_zeroconf
from llmd.app.host import Host
from llmd.app.security import HEADER_TIME, signed_headers
from netns import stop
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
def test_generation_across_three_agents_matches_transformers(pool, default_model_dir):
    secret, start = pool
    with ThreadPoolExecutor(3) as starting:  # each agent takes seconds to import and listen: at once
        list(starting.map(start, ["ws0", "ws1", "ws2"]))
    peers = parse_json_line(run_cli("peers", "--address", "127.0.0.1", "--timeout", "3", "--json",
                                    secret=secret).stdout)
    mine = [p for p in peers if p["health"] == "ok"]
    assert sorted(p["name"] for p in mine) == ["ws0", "ws1", "ws2"]
    assert all({"name", "address", "port", "devices"} <= p.keys() for p in mine)

    run = run_cli("generate", "--agents", "auto", "--expect", "3", "--address", "127.0.0.1", "--threads", "1",
                  "--compile", "off", "--greedy", "--chat", "--max-new-tokens", "12", "--json", PROMPT, secret=secret)
    assert run.returncode == 0, run.stderr
    out = parse_json_line(run.stdout)
    assert out["plan"]["world_size"] == 4  # the host's driver holds rank 0, the three agents ranks 1-3
    assert out["token_ids"] == hf_greedy(default_model_dir, out["prompt_token_ids"], 12)


def signed_request(agent, method, path, body=b"", secret=None, headers=None):
    h = signed_headers(secret, method, path, body) if secret else {}
    h.update(headers or {})
    if body:
        h["Content-Type"] = "application/json"
    return httpx.request(method, f"http://{agent.address}:{agent.port}{path}", content=body, headers=h, timeout=10)


def launch_body() -> bytes:
    return json.dumps({"launch_id": "evil", "master_addr": "127.0.0.1", "master_port": 9, "model": "default",
                       "plan": {"ranks": [{}, {}]}, "ranks": [{"rank": 1, "device": "cpu"}], "context": 64,
                       "timeout_s": 5}).encode()


def test_unsigned_bad_stale_and_replayed_requests_are_refused(pool):
    secret, start = pool
    agent = start("guarded")
    body = launch_body()
    assert signed_request(agent, "POST", "/v1/launch", body).status_code == 401  # unsigned
    assert signed_request(agent, "POST", "/v1/launch", body, secret="not-the-secret").status_code == 401
    stale = signed_headers(secret, "POST", "/v1/launch", body)
    stale[HEADER_TIME] = f"{time.time() - 3600:.3f}"  # the signature no longer matches either way
    assert signed_request(agent, "POST", "/v1/launch", body, headers=stale).status_code == 401
    # A captured, correctly signed request may not be sent twice.
    h = signed_headers(secret, "GET", "/v1/health")
    assert signed_request(agent, "GET", "/v1/health", headers=h).status_code == 200
    replay = signed_request(agent, "GET", "/v1/health", headers=h)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]
    # A body changed after signing fails too.
    tampered = signed_headers(secret, "POST", "/v1/launch", b"{}")
    assert signed_request(agent, "POST", "/v1/launch", body, headers=tampered).status_code == 401
    workers = signed_request(agent, "GET", "/v1/workers", secret=secret).json()["workers"]
    assert workers == [], "a refused request launched something"


def test_an_agent_of_another_pool_is_listed_but_cannot_be_joined(pool):
    secret, start = pool
    start("stranger", secret_override=new_secret())
    peers = parse_json_line(run_cli("peers", "--address", "127.0.0.1", "--timeout", "3", "--json",
                                    secret=secret).stdout)
    stranger = [p for p in peers if p["name"] == "stranger"]
    assert stranger and stranger[0]["health"] == "refused"
    with Host(secret, "127.0.0.1") as host:
        host.wait_for_peers(1, timeout_s=3)
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


@pytest.mark.slow
def test_an_agent_lost_mid_generation_is_a_clear_error(pool):
    secret, start = pool
    start("steady")
    doomed = start("doomed")
    proc = subprocess.Popen([*CLI, "generate", "--agents", "auto", "--expect", "2", "--address", "127.0.0.1",
                             "--threads", "1", "--compile", "off", "--greedy", "--ignore-eos", "--max-new-tokens", "1500",
                             "Once upon"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=host_env(secret))
    try:
        from netns import wait_for_output

        wait_for_output(proc, r"\S", timeout=180)  # text is streaming
        doomed.proc.kill()  # the agent and, with it, its worker
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode not in (0, None)
    err = stderr.decode()
    assert "llmd: error:" in err and "Traceback" not in err
    assert "worker" in err or "agent" in err


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
