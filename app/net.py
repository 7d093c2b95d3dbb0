"""Which address and interface this machine uses on the LAN."""

import socket

import psutil


def primary_address() -> str:
    """The IPv4 address the default route leaves by, else loopback. Sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.18.0.1", 9))  # any routable address; UDP connect only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def interface_of(address: str) -> str | None:
    """The name of the interface holding `address`: gloo and NCCL must use it (DESIGN.md, "Which network")."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def engine_env(address: str) -> dict[str, str]:
    """Environment for an engine process whose traffic must use `address`'s interface."""
    iface = interface_of(address)
    return {"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface} if iface else {}



def worker_failure(log_text: str) -> str:
    """The line of a worker's log that says why it stopped: its own error line if it wrote one,
    else the last line that is not one of torch's warnings (`[W...]`)."""
    lines = [line for line in log_text.strip().splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("llmd worker")]
    if own:
        return own[-1]
    plain = [line for line in lines if not line.startswith("[W")]
    return (plain or lines or [""])[-1]
