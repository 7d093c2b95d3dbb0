"""The launch's rendezvous: only holders of its key read or write it, it listens on the launch's address
alone, and it is closed once the ranks have joined."""

import socket

import httpx
import psutil
import pytest

from llmd.app.client import SignedClient
from llmd.app.launch import LocalCluster
from llmd.app.rendezvous import RemoteTable, pack
from llmd.app.rendezvous_server import Rendezvous
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import make_pipeline_plan
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec

KEY, LAUNCH = "k" * 64, "launch1"


def listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def rendezvous():
    r = Rendezvous("127.0.0.1", KEY, LAUNCH, timeout_s=10)
    yield r
    r.close()


def test_the_key_holder_reads_and_writes_and_waits(rendezvous):
    table = RemoteTable(rendezvous.url, KEY, LAUNCH)
    table.set("a", b"\x00\xffbytes")
    assert table.get("a") == b"\x00\xffbytes" and rendezvous.table.get("a") == b"\x00\xffbytes"
    assert table.get("absent", wait_s=0.2) is None
    assert table.add("n", 2) == 2 and table.add("n", 3) == 5
    assert table.compare_set("c", b"", b"one") == b"one" and table.compare_set("c", b"two", b"three") == b"one"
    assert table.check(["a", "n"]) and not table.check(["a", "absent"])
    assert table.delete("a") and not table.check(["a"])


@pytest.mark.parametrize("who", ["unsigned", "wrong key", "another launch"])
def test_a_client_without_the_key_can_neither_read_nor_write(rendezvous, who):
    rendezvous.table.set("gloo/addr", b"secret address")
    body = b'{"key": "gloo/addr", "value": "' + pack(b"forged").encode() + b'"}'
    if who == "unsigned":
        for op in ("get", "set"):
            r = httpx.post(f"{rendezvous.url}/v1/rendezvous/{op}", content=body,
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and b"secret address" not in r.content
    else:
        key, launch = ("x" * 64, LAUNCH) if who == "wrong key" else (KEY, "launch2")
        table = RemoteTable(rendezvous.url, key, launch)
        with pytest.raises(RuntimeError, match="did not prove|401"):
            table.get("gloo/addr")
        with pytest.raises(RuntimeError, match="did not prove|401"):
            table.set("gloo/addr", b"forged")
    assert rendezvous.table.get("gloo/addr") == b"secret address"


def test_it_listens_on_the_chosen_address_only_and_closes(rendezvous):
    assert listening_addresses(rendezvous.port) == {"127.0.0.1"}
    SignedClient("127.0.0.1", rendezvous.port, KEY, LAUNCH, what="rendezvous").post(
        "/v1/rendezvous/count", {})
    rendezvous.close()
    assert refused(rendezvous.port) and not listening_addresses(rendezvous.port)


def test_a_launch_closes_its_rendezvous_once_the_ranks_have_joined(tiny_models):
    model_dir = tiny_models["llama-gqa"]
    plan = make_pipeline_plan(ModelConfig.from_hf(load_hf_config(model_dir)), [1.0, 1.0, 1.0], 2)
    spec = RankSpec(model_dir=str(model_dir), plan=plan.to_dict(), rank=0, context=32)
    seen = {}

    class Watched(LocalCluster):
        def start_other_ranks(self, address, port):
            seen["port"] = port
            seen["listening"] = listening_addresses(port)
            super().start_other_ranks(address, port)

    with Watched(spec, 3) as cluster:
        assert seen["listening"] == {"127.0.0.1"}
        assert cluster.rendezvous is None and refused(seen["port"])
        # The ranks go on over the collectives' own connections.
        assert len(cluster.driver.generate([1, 2, 3], SamplingParams(max_new_tokens=4, greedy=True)).token_ids) == 4
