"""Separate workstations for tests, simulated as Linux network namespaces on one bridge.

    with Lan(2) as lan:
        server = lan.hosts[1].run_in([sys.executable, "-m", "http.server", "--bind", lan.hosts[1].address, "0"],
                                     stdout=subprocess.PIPE)
        ...
        lan.hosts[0].check_output([sys.executable, "-c", "..."])

Layout: every host is a namespace with one interface, `eth0`, holding 198.18.X.(i+1)/24 and a route for
224.0.0.0/4 so mDNS multicast flows. The other end of each veth sits in a "switch" namespace that holds the
bridge, so nothing at all is created in the root namespace: no address, no route, no interface there, and the
root namespace's firewall (br_netfilter, docker's FORWARD DROP) never sees the traffic. Only 198.18.0.0/15
(RFC 2544, set aside for network tests) is used and no namespace has a default route.

Names are `{prefix}-{pid}-{seq}-h{i}` for hosts and `{prefix}-{pid}-{seq}-sw` for the switch, so concurrent
runs and several Lans in one process never collide; leftovers of crashed runs (their pid is gone) are removed
when a Lan starts, and a Lan removes everything it made on exit, killing processes still inside.
"""

import functools
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Self

import pytest

IFACE = "eth0"  # the interface name in every host namespace
BRIDGE = "br0"  # the bridge, inside the switch namespace
IP_TIMEOUT = 10.0  # seconds for one `ip` command
_seq = itertools.count()  # Lans made by this process: part of their names


class NetnsError(RuntimeError): ...


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS...` with a bounded timeout; raise NetnsError with its stderr when it fails and check is set."""
    p = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=IP_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def netns_names() -> list[str]:
    """Names in `ip netns list` (each line is `NAME` or `NAME (id: N)`)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


@dataclass
class Host:
    """One simulated workstation: a network namespace with one interface `iface` holding `address`."""
    name: str
    address: str
    iface: str = IFACE

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run_in(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv inside the namespace (`ip netns exec` execs it: the Popen's pid is the command's own)."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(argv), **popen_kwargs)

    def check_output(self, argv: list[str], timeout: float = 30.0, **run_kwargs) -> str:
        """Run argv inside the namespace to completion and return its stdout as text; raise on a non-zero exit."""
        run_kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.run(self.argv(argv), check=False, capture_output=True, text=True, timeout=timeout, **run_kwargs)
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, p.args, p.stdout, p.stderr)
        return p.stdout


@dataclass
class Lan:
    """n_hosts namespaces on one bridge; a context manager. Hosts are `lan.hosts[i]`, addresses 198.18.X.(i+1)."""
    n_hosts: int
    prefix: str = "llmdt"
    hosts: list[Host] = field(init=False, default_factory=list)

    def __post_init__(self):
        assert 1 <= self.n_hosts <= 254, self.n_hosts
        assert re.fullmatch(r"[a-z][a-z0-9]*", self.prefix), self.prefix
        seq = next(_seq)
        self.base = f"{self.prefix}-{os.getpid()}-{seq}"
        self.switch = f"{self.base}-sw"
        x = (os.getpid() + seq) % 512  # 512 /24 subnets in 198.18.0.0/15
        self.subnet = f"198.{18 + x // 256}.{x % 256}.0/24"
        net = self.subnet.rsplit(".", 1)[0]
        self.hosts = [Host(f"{self.base}-h{i}", f"{net}.{i + 1}") for i in range(self.n_hosts)]

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, *(h.name for h in self.hosts)]

    def __enter__(self) -> Self:
        remove_stale(self.prefix)
        self._remove()  # a leftover with our very names (a crashed run whose pid was reused)
        try:
            self._create()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _create(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "name", BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        ip("-n", self.switch, "link", "set", BRIDGE, "up")
        for i, host in enumerate(self.hosts):
            port = f"p{i}"  # the veth end in the switch namespace
            ip("netns", "add", host.name)
            ip("-n", host.name, "link", "set", "lo", "up")
            ip("-n", host.name, "link", "add", "name", host.iface,
               "type", "veth", "peer", "name", port, "netns", self.switch)
            ip("-n", self.switch, "link", "set", port, "master", BRIDGE)
            ip("-n", self.switch, "link", "set", port, "up")
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.iface)
            ip("-n", host.name, "link", "set", host.iface, "up")
            ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", host.iface)

    def _remove(self) -> None:
        """Kill what runs inside, then delete bridge, veths and namespaces; ignores what is already gone, safe to repeat."""
        remove_namespaces(self.namespaces)


def remove_namespaces(names: list[str]) -> None:
    present = set(netns_names())
    names = [n for n in names if n in present]
    for name in names:
        for pid in ip("netns", "pids", name, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in names:
        # Deleting a namespace takes its veth ends, and the peers with them; remove them explicitly all the same.
        for link in re.findall(r"^\d+: ([^:@]+)", ip("-n", name, "-o", "link", "show", check=False), re.MULTILINE):
            if link != "lo":
                ip("-n", name, "link", "del", link, check=False)
        ip("netns", "del", name, check=False)


def remove_stale(prefix: str) -> None:
    """Remove namespaces named by a Lan with this prefix whose process no longer exists."""
    stale = []
    for name in netns_names():
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-\d+-(?:sw|h\d+)", name)
        if m and not _alive(int(m.group(1))):
            stale.append(name)
    remove_namespaces(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_output(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    """Read proc.stdout (a binary PIPE) until a line matches pattern; raise if it exits or the time runs out.

    Reads the raw fd, so give the child unbuffered output (`python -u`) and never mix in proc.stdout.read()."""
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if m := re.search(pattern, line):
                    return m
    raise TimeoutError(f"no line matching {pattern!r} within {timeout}s (exit code {proc.poll()}): {buf[-2000:]!r}")


def stop(*procs: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Terminate, then kill, each process; reap them all."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
    for p in procs:
        if p is None:
            continue
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None where namespaces, veths and bridges can be made here; else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not found"
    probe = f"llmdprobe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "name", "vprobe0", "type", "veth", "peer", "name", "vprobe1")
        ip("-n", probe, "link", "add", "name", "brprobe", "type", "bridge")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        ip("netns", "del", probe, check=False)
    return None


def netns_available() -> bool:
    return netns_unavailable_reason() is None


requires_netns = pytest.mark.skipif(
    not netns_available(), reason=f"network namespaces cannot be made here: {netns_unavailable_reason()}")
