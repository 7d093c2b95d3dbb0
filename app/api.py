"""The OpenAI-compatible API under /v1: models, chat completions and completions, streamed or not.

Requests go through the same serving loop and queue as the web page's chats, are journalled the same
way, and are attributed to the API key they came with. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for anything the client sent
wrong; nothing a client sends is echoed back.

A key is required whenever the server listens beyond loopback or any key exists; a loopback-only
server with no keys is open, as local tools expect.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmd.engine.errors import BadSampling, LlmdError, PromptTooLong
from llmd.engine.sampling import SamplingParams
from llmd.engine.scheduler import QueueFull

from .guard import Area, PlainJSON
from .keys import key_name
from .pool import Pool
from .serving import Failed, Finished, PoolNotReady, Reply, Request, Ticket, Token
from .store import Store

MAX_API_BODY = 1 << 20  # bytes: a long conversation is well under this
POLL_S = 0.25  # how often a waiting handler checks that its client is still there
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: ApiError) -> PlainJSON:
    return PlainJSON(error_body(e.status, e.message, e.kind, e.param, e.code), status_code=e.status)


def site_error(status: int, message: str, close: bool = False) -> PlainJSON:
    """What the site's guard answers on /v1 (a body too large, a foreign host or origin), in OpenAI's shape."""
    return PlainJSON(error_body(status, message), status_code=status, headers={"Connection": "close"} if close else None)


API_AREA = Area("/v1/", MAX_API_BODY, site_error)


# ---- request bodies: strict types, unknown fields ignored (clients send many we do not use)

class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s)


class ChatBody(Common):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionBody(Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ---- who may call

@dataclass
class ApiAuth:
    store: Store
    listen: bool  # served beyond loopback: a key is always required

    def check(self, headers) -> str | None:
        """The caller's key name (None on an open server); raises ApiError 401 otherwise."""
        given = headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if given and scheme.lower() == "bearer":
            name = key_name(self.store, key.strip())
            if name is not None:
                return name
        if not self.listen and not self.store.any_live_key():
            return None
        why = "a wrong or revoked API key" if given else "no API key (send Authorization: Bearer KEY)"
        raise ApiError(401, f"this server needs an API key: {why}; `llmd keys create NAME` makes one",
                       code="invalid_api_key")


# ---- the routes

def add_api(app: FastAPI, pool: Pool, auth: ApiAuth) -> None:
    @app.get("/v1/models")
    async def models(request: HttpRequest):
        try:
            auth.check(request.headers)
        except ApiError as e:
            return error_response(e)
        name = pool.model_name()
        data = [] if name is None else [{"id": name, "object": "model", "created": 0, "owned_by": "llmd"}]
        return PlainJSON({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await handle(request, pool, auth, ChatBody, chat_request, chat_format)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await handle(request, pool, auth, CompletionBody, completion_request, completion_format)


async def handle(http: HttpRequest, pool: Pool, auth: ApiAuth, kind: type[Common],
                 build: Callable[[Common, Pool], Request], fmt: "Format") -> Response:
    def prepare() -> Ticket:  # the chat template, the tokenizer and the journal's write: off the event loop
        request = build(body, pool)
        request.api_key, request.user = key, body.user or key or "api"
        return submit(pool, request)

    try:
        key = auth.check(http.headers)
        body = parse(await http.body(), kind)
        check_model(body.model, pool)
        ticket = await asyncio.to_thread(prepare)
    except ApiError as e:
        return error_response(e)
    name = pool.model_name() or body.model
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(http, ticket, fmt, name, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, reply, failed = "", None, None
    async for event in events(http, ticket):
        if isinstance(event, Token):
            text += event.text
        elif isinstance(event, Finished):
            reply = event.reply
        elif isinstance(event, Failed):
            failed = event.error
    if reply is None:
        return error_response(ApiError(503, f"the request failed: {failed or 'the client went away'}",
                                       kind="server_error"))
    return PlainJSON(fmt.whole(ticket.id, name, reply))


def parse(raw: bytes, kind: type[Common]) -> Common:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"invalid {where}: {first['msg']}", param=where) from None
    if body.n not in (None, 1):
        raise ApiError(400, "n must be 1: one choice per request", param="n")
    return body


def check_model(model: str, pool: Pool) -> None:
    name = pool.model_name()
    if name is None:
        return  # no model yet: submitting answers 503 with the reason
    if model not in (name, "default"):
        raise ApiError(404, f"model {model[:100]!r} is not served here; GET /v1/models lists the model",
                       param="model", code="model_not_found")


def sampling(body: Common, pool: Pool) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    budget = body.max_completion_tokens or body.max_tokens or pool.context
    try:
        return SamplingParams(max_new_tokens=budget, greedy=temperature == 0, temperature=temperature or 1.0,
                              top_k=0, top_p=1.0 if body.top_p is None else body.top_p,
                              stop_token_ids=pool.text_model().stop_token_ids, seed=body.seed)
    except BadSampling as e:
        raise ApiError(400, str(e)) from None


def chat_request(body: ChatBody, pool: Pool) -> Request:
    text = ready(pool).text_model()
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        ids = text.chat_ids(messages)
    except LlmdError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:  # the model's chat template refused the conversation (e.g. roles out of order)
        raise ApiError(400, f"the model's chat template refused these messages: {str(e)[:200]}",
                       param="messages") from None
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return Request(ids, sampling(body, pool), prompt_text=last_user, stop=body.stops())


def completion_request(body: CompletionBody, pool: Pool) -> Request:
    ids = ready(pool).text_model().encode(body.text())
    return Request(ids, sampling(body, pool), prompt_text=body.text(), stop=body.stops())


def ready(pool: Pool) -> Pool:
    try:
        pool.text_model()
    except PoolNotReady as e:
        raise ApiError(503, str(e), kind="server_error", code="model_not_ready") from None
    return pool


def submit(pool: Pool, request: Request) -> Ticket:
    try:
        return pool.submit(request)
    except PromptTooLong as e:
        raise ApiError(400, str(e).split(" (raise")[0], param="messages", code="context_length_exceeded") from None
    except QueueFull as e:
        raise ApiError(429, str(e), kind="rate_limit_error", code="busy") from None
    except PoolNotReady as e:
        raise ApiError(503, str(e), kind="server_error", code="model_not_ready") from None


async def events(http: HttpRequest, ticket: Ticket) -> AsyncIterator:
    """The ticket's events, cancelling its request when the client goes away."""
    done = False
    try:
        while True:
            event = await asyncio.to_thread(ticket.get, POLL_S)
            if event is None:
                if await http.is_disconnected():
                    return
                continue
            yield event
            if isinstance(event, Finished | Failed):
                done = True
                return
    finally:
        if not done:
            ticket.cancel()


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def stream(http: HttpRequest, ticket: Ticket, fmt: "Format", model: str, usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    yield sse(fmt.chunk(ticket.id, model, created, "", first=True))
    async for event in events(http, ticket):
        if isinstance(event, Token) and event.text:
            yield sse(fmt.chunk(ticket.id, model, created, event.text))
        elif isinstance(event, Finished):
            yield sse(fmt.chunk(ticket.id, model, created, "", finish=FINISH[event.reply.finish_reason]))
            if usage:
                yield sse({**fmt.chunk(ticket.id, model, created, ""), "choices": [], "usage": usage_of(event.reply)})
        elif isinstance(event, Failed):
            yield sse(error_body(503, f"the request failed: {event.error}", "server_error"))
    yield sse("[DONE]")


def usage_of(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens}


# ---- the two answer shapes

@dataclass(frozen=True)
class Format:
    prefix: str
    whole_object: str
    chunk_object: str
    chat: bool

    def whole(self, request_id: str, model: str, reply: Reply) -> dict:
        choice = {"index": 0, "finish_reason": FINISH[reply.finish_reason], "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": reply.text}
        else:
            choice["text"] = reply.text
        return {"id": self.prefix + request_id, "object": self.whole_object, "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage_of(reply)}

    def chunk(self, request_id: str, model: str, created: int, text: str, first: bool = False,
              finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": self.prefix + request_id, "object": self.chunk_object, "created": created, "model": model,
                "choices": [choice]}


chat_format = Format("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
completion_format = Format("cmpl-", "text_completion", "text_completion", chat=False)
