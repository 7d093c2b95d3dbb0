"""Signed HTTP calls to a receiver of the control plane (an agent, a launch's rendezvous), trusting
only answers the receiver signed for this very request."""

import json
import socket

import httpx

from llmd.engine.errors import LlmdError

from .security import answer_is_genuine, receiver_name, signed_headers


# Shared by every call (httpx pools connections per address, safely across threads). TCP_NODELAY: a
# request's headers and body go out in two writes, and without it the body waits for the server's
# delayed ACK, 40 ms a call.
HTTP = httpx.Client(transport=httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]))


def http_base(address: str, port: int) -> str:
    """http://ADDRESS:PORT, an IPv6 address in brackets: how a receiver is called (and named in `Fetch`)."""
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


class AgentRefused(LlmdError): ...


class AgentUnreachable(LlmdError): ...


class SignedClient:
    def __init__(self, address: str, port: int, secret: str, receiver_id: str, timeout_s: float = 10.0,
                 what: str = "agent"):
        self.receiver = receiver_name(receiver_id, address, port)
        self.base = http_base(address, port)
        self.secret, self.timeout_s, self.what = secret, timeout_s, what

    def call(self, method: str, path: str, payload: dict | None = None, timeout_s: float | None = None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else b""
        headers = signed_headers(self.secret, method, path, self.receiver, body)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        where = f"{self.what} at {self.base}"
        try:
            r = HTTP.request(method, self.base + path, content=body, headers=headers,
                              timeout=timeout_s or self.timeout_s)
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"{where} did not answer {method} {path}: {e}") from None
        if not answer_is_genuine(self.secret, headers, r.status_code, r.headers, r.content):
            why = plain_error(r)
            raise AgentRefused(f"{where} did not prove it holds the pool secret ({why}): an agent of another "
                               "pool, or an impostor")
        if r.status_code >= 400:
            raise AgentRefused(f"{where} answered {r.status_code} to {method} {path}: {plain_error(r)}")
        return r.json()

    def get(self, path: str, **kw) -> dict:
        return self.call("GET", path, **kw)

    def post(self, path: str, payload: dict, **kw) -> dict:
        return self.call("POST", path, payload, **kw)


def plain_error(r: httpx.Response) -> str:
    """An answer's error line, cut short: the answer may come from anyone."""
    try:
        text = str(r.json().get("error"))
    except (ValueError, AttributeError):
        text = f"{r.status_code}, {r.text!r}"
    return text[:300]


class AgentClient(SignedClient):
    def __init__(self, address: str, port: int, secret: str, agent_id: str, timeout_s: float = 10.0):
        super().__init__(address, port, secret, agent_id, timeout_s)
