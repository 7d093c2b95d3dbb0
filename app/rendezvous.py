"""The rendezvous where a launch's ranks find each other, open only to holders of its key.

torch's TCPStore listens on every interface and lets anyone read and write its keys. Instead, the
driver serves the keys over the signed control plane (`SignedApi`), bound to the launch's address
on a fresh port, and only until every rank has joined and run a step: `TableStore` is the
torch.distributed Store the process group is built on, over the table here (rank 0) or over
signed HTTP (the other ranks). The server is in rendezvous_server.py, apart, so that a worker
imports no web server. A launch on agents is keyed with the pool secret, a launch of local
workers with a fresh key; the workers read it from their environment, so it never crosses the wire.
"""

import base64
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
from .client import AgentRefused, AgentUnreachable, SignedClient

KEY_ENV = "LLMD_RENDEZVOUS_KEY"
MAX_KEYS = 10_000
MAX_VALUE = 64 * 1024  # gloo's and NCCL's addresses and ids are tens of bytes
LONG_POLL_S = 2.0


class Full(Exception): ...


class Table:
    """The keys, and a condition to wait on for one to appear."""

    def __init__(self):
        self._data: dict[str, bytes] = {}
        self._changed = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self._changed:
            if key not in self._data and len(self._data) >= MAX_KEYS:
                raise Full(f"the rendezvous holds {MAX_KEYS} keys already")
            self._data[key] = value
            self._changed.notify_all()

    def get(self, key: str, wait_s: float = 0.0) -> bytes | None:
        with self._changed:
            self._changed.wait_for(lambda: key in self._data, timeout=wait_s)
            return self._data.get(key)

    def check(self, keys: list[str]) -> bool:
        with self._changed:
            return all(k in self._data for k in keys)

    def add(self, key: str, amount: int) -> int:
        with self._changed:
            value = int(self._data.get(key, b"0")) + amount
            self.set(key, str(value).encode())
            return value

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self._changed:
            current = self._data.get(key)
            if current == expected or (current is None and expected == b""):
                self.set(key, desired)
                return desired
            return current if current is not None else expected

    def delete(self, key: str) -> bool:
        with self._changed:
            return self._data.pop(key, None) is not None

    def count(self) -> int:
        with self._changed:
            return len(self._data)


class TableStore(dist.Store):
    """A torch.distributed Store over a Table, or over a RemoteTable with the same methods."""

    def __init__(self, table, timeout_s: float):
        super().__init__()
        self.table, self.timeout_s = table, timeout_s

    def set(self, key, value):
        self.table.set(key, as_bytes(value))

    def get(self, key):
        deadline = time.monotonic() + self.timeout_s
        while True:
            value = self.table.get(key, min(LONG_POLL_S, max(deadline - time.monotonic(), 0.0)))
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rendezvous: no {key!r} within {self.timeout_s:.0f} s")

    def wait(self, keys, timeout=None):
        limit = timeout.total_seconds() if isinstance(timeout, timedelta) else self.timeout_s
        deadline = time.monotonic() + limit
        for key in keys:  # each wait blocks on the server until its key is set
            while self.table.get(key, min(LONG_POLL_S, max(deadline - time.monotonic(), 0.0))) is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"rendezvous: {list(keys)} not all set within {limit:.0f} s")

    def check(self, keys):
        return self.table.check(list(keys))

    def add(self, key, value):
        return self.table.add(key, int(value))

    def compare_set(self, key, expected, desired):
        return self.table.compare_set(key, as_bytes(expected), as_bytes(desired))

    def delete_key(self, key):
        return self.table.delete(key)

    def num_keys(self):
        return self.table.count()


def as_bytes(value) -> bytes:
    """torch passes bytes; Python callers (the ranks' ready keys) may pass text, as to any Store."""
    return value.encode() if isinstance(value, str) else bytes(value)


def pack(value: bytes) -> str:
    return base64.b64encode(value).decode()


def unpack(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class RemoteTable:
    """The driver's Table, over signed HTTP."""

    def __init__(self, url: str, key: str, launch_id: str, timeout_s: float = 30.0):
        address, port = url.removeprefix("http://").rsplit(":", 1)
        self.client = SignedClient(address.strip("[]"), int(port), key, launch_id, timeout_s, what="rendezvous")

    def _run(self, name: str, **fields):
        try:
            return self.client.post(f"/v1/rendezvous/{name}", fields,
                                    timeout_s=self.client.timeout_s + fields.get("wait_s", 0.0))["result"]
        except (AgentRefused, AgentUnreachable) as e:
            raise RuntimeError(str(e)) from None  # what torch.distributed expects of a failing store

    def set(self, key, value):
        self._run("set", key=key, value=pack(value))

    def get(self, key, wait_s=0.0):
        value = self._run("get", key=key, wait_s=wait_s)
        return None if value is None else unpack(value)

    def check(self, keys):
        return self._run("check", keys=keys)

    def add(self, key, amount):
        return self._run("add", key=key, amount=amount)

    def compare_set(self, key, expected, desired):
        return unpack(self._run("compare_set", key=key, expected=pack(expected), value=pack(desired)))

    def delete(self, key):
        return self._run("delete", key=key)

    def count(self):
        return self._run("count")


def rendezvous_url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def worker_command(spec, url: str, launch_id: str) -> list[str]:
    """The command line of a worker rank; its rendezvous key goes in its environment ($LLMD_RENDEZVOUS_KEY)."""
    return [sys.executable, "-m", "llmd.app.worker", "--spec", spec.to_json(), "--rendezvous", url,
            "--launch", launch_id]
