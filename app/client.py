"""Signed HTTP calls to an agent's control API."""

import json

import httpx

from llmd.engine.errors import LlmdError

from .security import signed_headers


class AgentRefused(LlmdError): ...


class AgentUnreachable(LlmdError): ...


class AgentClient:
    def __init__(self, address: str, port: int, secret: str, timeout_s: float = 10.0):
        self.base = f"http://{address}:{port}"
        self.secret, self.timeout_s = secret, timeout_s

    def call(self, method: str, path: str, payload: dict | None = None, timeout_s: float | None = None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else b""
        headers = signed_headers(self.secret, method, path, body)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            r = httpx.request(method, self.base + path, content=body, headers=headers,
                              timeout=timeout_s or self.timeout_s)
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"agent at {self.base} did not answer {method} {path}: {e}") from None
        if r.status_code == 401:
            raise AgentRefused(f"agent at {self.base} refused the request ({r.json().get('error')}): "
                               "is it in another pool (a different secret)?")
        if r.status_code >= 400:
            raise AgentRefused(f"agent at {self.base} answered {r.status_code} to {method} {path}: {r.text[:300]}")
        return r.json()

    def get(self, path: str, **kw) -> dict:
        return self.call("GET", path, **kw)

    def post(self, path: str, payload: dict, **kw) -> dict:
        return self.call("POST", path, payload, **kw)
