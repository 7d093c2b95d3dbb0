"""What llmd's HTTP servers do before any handler runs, and how they answer bad input.

Every server (agent API, rendezvous, web UI) assumes a hostile machine on the LAN: a request's
headers must arrive within HEADER_TIMEOUT_S and its body within BODY_TIMEOUT_S, and a body is cut
off at the server's cap while it is read, before anything else looks at it. The control plane
(`SignedApi`) then checks the request's signature and signs the answer. Errors have one shape,
`{"error": "..."}`, with a 4xx status, and never echo what was sent.
"""

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .security import HEADER_ANSWER, Verifier

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
MAX_CONTROL_BODY = 1 << 20  # a launch request with its plan is a few kB


class GuardedH11(H11Protocol):
    """uvicorn waits as long as a client likes for a request's headers: close a connection whose next
    request has not sent them within HEADER_TIMEOUT_S, so slow clients cannot hold sockets open.
    And answer without Nagle's delay: uvicorn writes an answer's head and body apart, and on a socket
    it was handed the body then waits for the client's delayed ACK, 40 ms an answer."""

    def connection_made(self, transport):
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._expect_headers()

    def on_response_complete(self):
        super().on_response_complete()
        self._expect_headers()

    def _expect_headers(self):
        self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late, self.cycle)

    def _headers_late(self, cycle):
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def server_config(app, **kw) -> uvicorn.Config:
    return uvicorn.Config(app, http=GuardedH11, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_keep_alive=5, log_level="warning", **kw)


class PlainJSON(JSONResponse):
    """JSON in ASCII: a lone surrogate or NaN in an answer is escaped or refused here, not a 500 later."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else None
    return PlainJSON({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(Exception): ...


class ClientGone(Exception): ...


async def read_body(receive, limit: int) -> bytes:
    """The whole body, refused once it passes `limit` bytes or takes over BODY_TIMEOUT_S to arrive."""
    loop = asyncio.get_running_loop()
    end, chunks, size = loop.time() + BODY_TIMEOUT_S, [], 0
    while True:
        message = await asyncio.wait_for(receive(), timeout=max(end - loop.time(), 0.0))
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def declared_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else -1
    return None


def chunked(scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


async def send_response(send, response: JSONResponse) -> None:
    await response({"type": "http"}, None, send)


class BoundedBody:
    """ASGI middleware: a request's body, read whole within the cap and the time limit, then handed on
    to the app (which reads it from memory). Over the cap: 413; too slow: 408; both close the connection.
    With `require_length`, a body must declare its length (411 otherwise), so one over the cap is refused
    before a byte of it is read."""

    def __init__(self, app, limit: int, require_length: bool = False, errors=error):
        self.app, self.limit, self.require_length = app, limit, require_length
        self.errors = errors  # (status, message, close) -> the answer: one error shape per server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = declared_length(scope)
        if length is not None and not 0 <= length <= self.limit:
            return await send_response(send, self.errors(413, f"body over {self.limit} bytes", close=True))
        if length is None and self.require_length and chunked(scope):
            return await send_response(send, self.errors(411, "a body must declare its Content-Length", close=True))
        try:
            body = await read_body(receive, self.limit)
        except BodyTooLarge:
            return await send_response(send, self.errors(413, f"body over {self.limit} bytes", close=True))
        except TimeoutError:
            return await send_response(send, self.errors(408, "the body took too long to arrive", close=True))
        except ClientGone:
            return None
        await self.handle(scope, body, replay(body, receive), send)

    async def handle(self, scope, body: bytes, receive, send):
        await self.app(scope, receive, send)


def replay(body: bytes, receive):
    """An ASGI `receive` that yields the body already read, then whatever the client does next."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class SignedApi(BoundedBody):
    """The control plane's middleware: refuse a request that `verifier` does not accept (401, and the
    body was capped before), sign the answer to one it does over the request's nonce."""

    def __init__(self, app, verifier: Verifier, limit: int = MAX_CONTROL_BODY):
        super().__init__(app, limit, require_length=True)
        self.verifier = verifier

    async def handle(self, scope, body: bytes, receive, send):
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        verdict = self.verifier.check(scope["method"], target, headers, body)
        if verdict.why:
            return await send_response(send, error(401, verdict.why))
        start, chunks = {}, []

        async def keep(message):  # the answer is signed whole: hold it until its last byte
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    answer = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # a slice of megabytes: no copy
                    sig = self.verifier.sign_answer(start["status"], verdict.nonce, answer)
                    headers = [h for h in start.get("headers", []) if h[0].lower() != b"content-length"]
                    headers += [(HEADER_ANSWER.lower().encode(), sig.encode()),
                                (b"content-length", str(len(answer)).encode())]
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": answer})

        await self.app(scope, receive, keep)


def plain_errors(app: FastAPI) -> None:
    """Bad input answered in the one error shape, naming the field but never echoing its value (an echo
    of NaN or of invalid UTF-8 is what made FastAPI's own 422 answer fail with a 500)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(400, f"invalid request: {where}: {first.get('msg', 'malformed')}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))


def bound_socket(address: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to this one address (never every interface)."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


class ThreadServer:
    """A uvicorn server, in a thread of this process, on a socket bound to one address: bind first
    (the port is part of the receiver's name), then `start` the app."""

    def __init__(self, address: str, port: int = 0):
        self.sock = bound_socket(address, port)
        self.address, self.port = address, self.sock.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def start(self, app) -> None:
        self.server = uvicorn.Server(server_config(app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"llmd-http-{self.port}")
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.sock.close()


@dataclass(frozen=True)
class Area:
    """A part of a site with a body cap and an error shape of its own (the API under /v1)."""

    prefix: str
    limit: int
    errors: Callable[..., JSONResponse]


class OwnSite:
    """ASGI middleware for the web UI: answer only requests addressed to one of `hosts` (a page on another
    name, as in DNS rebinding, is refused), from no Origin or one of this site's own, on no blocked path
    (uploads), with bodies capped like any other server's (`areas` cap and answer their paths their way)."""

    def __init__(self, app, hosts: list[str], port: int, blocked: tuple[str, ...] = (), limit: int = 4 << 20,
                 areas: tuple[Area, ...] = ()):
        self.app = BoundedBody(app, limit)
        self.areas = [(a, BoundedBody(app, a.limit, errors=a.errors)) for a in areas]
        self.authorities = {f"{h}:{port}" for h in hosts}
        self.origins = {f"http://{a}" for a in self.authorities}
        self.blocked = blocked

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        area, app = next(((a, b) for a, b in self.areas if scope["path"].startswith(a.prefix)), (None, self.app))
        status, why = self.refusal(scope)
        if why is None:
            return await app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        return await send_response(send, (area.errors if area else error)(status, why))

    def refusal(self, scope) -> tuple[int, str | None]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if headers.get("host", "") not in self.authorities:
            return 400, "this server does not answer to that host name"
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return 403, "requests from other sites are refused"
        if scope["path"].startswith(self.blocked):
            return 404, "not here"
        return 200, None
