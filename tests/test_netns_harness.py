"""The namespace harness carries real traffic: TCP between hosts, multicast mDNS, and leaves nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netns import BRIDGE, Lan, ip, netns_names, requires_netns, stop, wait_for_output

pytestmark = [requires_netns, pytest.mark.timeout(120)]

SERVICE_TYPE = "_llmdtest._tcp.local."

# Fetch a URL without any proxy from the environment: the LAN has no way out anyway.
FETCH = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open(sys.argv[1], timeout=10).read().decode())
"""

# Register one service on the given address, say so, then stay up until terminated.
REGISTER = """
import socket, sys, time
from zeroconf import ServiceInfo, Zeroconf
addr, type_, instance = sys.argv[1:4]
zc = Zeroconf(interfaces=[addr])
info = ServiceInfo(type_, f"{instance}.{type_}", addresses=[socket.inet_aton(addr)], port=8123,
                   properties={"role": "worker", "gpus": "2"}, server=f"{instance}.local.")
zc.register_service(info)
print("registered", flush=True)
time.sleep(60)
"""

# Browse for the type on the given address; print the first service found, fully resolved, as JSON.
BROWSE = """
import json, sys, threading
from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf
addr, type_ = sys.argv[1:3]
names, found = [], threading.Event()
def on_change(zeroconf, service_type, name, state_change):
    if state_change is ServiceStateChange.Added:
        names.append(name)
        found.set()
zc = Zeroconf(interfaces=[addr])
try:
    ServiceBrowser(zc, type_, handlers=[on_change])
    if not found.wait(10):
        sys.exit("no service found")
    info = zc.get_service_info(type_, names[0], timeout=5000)
    if info is None:
        sys.exit(f"{names[0]} did not resolve")
    print(json.dumps({"name": info.name, "server": info.server, "port": info.port,
                      "addresses": info.parsed_addresses(),
                      "properties": {k.decode(): v.decode() for k, v in info.properties.items()}}))
finally:
    zc.close()
"""


def _children() -> list[int]:
    """Live (non-zombie) child processes of this test process."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and state != "Z":
            kids.append(int(entry.name))
    return kids


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = set(_children())
    yield
    assert set(_children()) <= before, "a child process outlived its test"


@pytest.fixture
def lan():
    with Lan(2) as lan:
        yield lan


def test_http_between_hosts(lan, tmp_path):
    client, server_host = lan.hosts
    (tmp_path / "hello.txt").write_text("hello from host 1")
    server = None
    try:
        server = server_host.run_in(
            [sys.executable, "-u", "-m", "http.server", "--bind", server_host.address, "--directory", str(tmp_path),
             "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        port = wait_for_output(server, r"port (\d+)", timeout=15).group(1)
        url = f"http://{server_host.address}:{port}/hello.txt"
        assert client.check_output([sys.executable, "-c", FETCH, url], timeout=20).strip() == "hello from host 1"
        assert server.poll() is None
    finally:
        stop(server)


def test_no_route_off_the_lan(lan):
    host = lan.hosts[0]
    routes = host.check_output(["ip", "route", "show"], timeout=10)
    assert "default" not in routes
    assert "224.0.0.0/4 dev eth0" in routes
    probe = "import socket; s = socket.socket(); s.settimeout(3); print(s.connect_ex(('192.0.2.1', 80)))"
    assert int(host.check_output([sys.executable, "-c", probe], timeout=10)) != 0  # ENETUNREACH


def test_mdns_between_hosts(lan):
    browser_host, service_host = lan.hosts
    registrar = None
    try:
        registrar = service_host.run_in(
            [sys.executable, "-u", "-c", REGISTER, service_host.address, SERVICE_TYPE, "ws1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_output(registrar, r"^registered$", timeout=15)
        out = browser_host.check_output([sys.executable, "-c", BROWSE, browser_host.address, SERVICE_TYPE],
                                        timeout=30)
        found = json.loads(out.strip().splitlines()[-1])
        assert found["name"] == f"ws1.{SERVICE_TYPE}"
        assert found["server"] == "ws1.local."
        assert found["addresses"] == [service_host.address]
        assert found["port"] == 8123
        assert found["properties"] == {"role": "worker", "gpus": "2"}
        assert registrar.poll() is None
    finally:
        stop(registrar)


def _host_links(kind: str) -> set[str]:
    return set(ip("-o", "link", "show", "type", kind).splitlines())


def test_cleanup_removes_everything():
    bridges, veths = _host_links("bridge"), _host_links("veth")
    with Lan(2) as lan:
        assert set(lan.namespaces) <= set(netns_names())
        ip("-n", lan.switch, "link", "show", BRIDGE)  # the bridge lives in the switch namespace
        assert _host_links("bridge") == bridges and _host_links("veth") == veths  # nothing in the root namespace
        left_running = lan.hosts[0].run_in(["sleep", "60"])
    try:
        assert left_running.wait(5) == -9  # killed by the exit
        assert not set(lan.namespaces) & set(netns_names())
        assert ip("-n", lan.switch, "link", "show", BRIDGE, check=False) == ""
        assert _host_links("bridge") == bridges and _host_links("veth") == veths
    finally:
        stop(left_running)


def test_cleanup_after_failure():
    lan = Lan(1)
    with pytest.raises(RuntimeError, match="boom"), lan:
        raise RuntimeError("boom")
    assert not set(lan.namespaces) & set(netns_names())


def test_leftovers_removed_first():
    dead = subprocess.Popen(["true"])
    dead.wait(5)
    crashed = f"llmdtstale-{dead.pid}-0-h0"  # from a run whose process is gone
    lan = Lan(1, prefix="llmdtstale")
    try:
        ip("netns", "add", crashed)
        ip("netns", "add", lan.hosts[0].name)  # a leftover with the very names this Lan will use
        ip("-n", lan.hosts[0].name, "link", "add", "name", "eth0", "type", "veth", "peer", "name", "stale1")
        with lan:
            assert crashed not in netns_names()
            out = lan.hosts[0].check_output(["ip", "-o", "addr", "show", "dev", "eth0"], timeout=10)
            assert f"{lan.hosts[0].address}/24" in out
        assert not {crashed, *lan.namespaces} & set(netns_names())
    finally:
        ip("netns", "del", crashed, check=False)
        ip("netns", "del", lan.hosts[0].name, check=False)
