"""The agent's control API against a hostile client on loopback: fuzzed authentication, fuzzed signed bodies,
an impostor agent, huge and slow requests. Two real agents serve the whole module."""

import json
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil
import pytest

from agents import new_secret, start_agent
from llmd.app.client import AgentRefused
from llmd.app.discovery import Advert, Advertiser, open_zeroconf
from llmd.app.guard import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_CONTROL_BODY
from llmd.app.host import Host
from llmd.app.security import HEADER_NONCE, HEADER_RECEIVER, HEADER_SIG, HEADER_TIME, receiver_name, signed_headers
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import make_pipeline_plan
from netns import stop

SECRET = new_secret()
ENDPOINTS = [("GET", "/v1/health"), ("GET", "/v1/inventory"), ("GET", "/v1/metrics"), ("GET", "/v1/workers"),
             ("POST", "/v1/launch"), ("POST", "/v1/stop")]


@pytest.fixture(scope="module")
def agents():
    with ThreadPoolExecutor(2) as starting:
        started = list(starting.map(lambda name: start_agent(name, SECRET), ["alpha", "beta"]))
    yield started
    stop(*[a.proc for a in started])


def receiver(agent) -> str:
    return receiver_name(agent.agent_id, agent.address, agent.port)


def send(client: httpx.Client, agent, method: str, target: str, headers: dict, body: bytes = b"") -> httpx.Response:
    if body:
        headers = {**headers, "Content-Type": "application/json"}
    headers = {k: v.encode() if isinstance(v, str) else v for k, v in headers.items()}  # non-ASCII as sent raw
    return client.request(method, f"http://{agent.address}:{agent.port}{target}", content=body, headers=headers)


def nodelay_client(timeout_s: float) -> httpx.Client:
    """Like the host's own client (app/client.py): without TCP_NODELAY each request waits 40 ms for an ACK."""
    return httpx.Client(timeout=timeout_s, transport=httpx.HTTPTransport(
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]))


def signed(agent, method: str, target: str, body: bytes = b"", secret: str = SECRET) -> dict:
    return signed_headers(secret, method, target, receiver(agent), body)


def nothing_running(agent) -> bool:
    with httpx.Client() as client:
        workers = send(client, agent, "GET", "/v1/workers", signed(agent, "GET", "/v1/workers")).json()["workers"]
    return workers == [] and psutil.Process(agent.proc.pid).children(recursive=True) == []


@pytest.fixture(scope="module")
def launch(default_model_dir) -> dict:
    """A launch every agent would obey: a real plan of the bundled model, rank 1 on a CPU."""
    plan = make_pipeline_plan(ModelConfig.from_hf(load_hf_config(default_model_dir)), [1.0, 1.0], 1)
    return {"launch_id": "fuzz", "master_addr": "127.0.0.1", "master_port": 9, "model": "default",
            "plan": plan.to_dict(), "ranks": [{"rank": 1, "device": "cpu"}], "context": 64, "timeout_s": 5}


def bad_requests(rng: random.Random, alpha, beta, body: bytes, client: httpx.Client):
    """(kind, agent, method, target, headers, body): requests no agent may obey, each kind built from a
    genuine one. Replays are sent once genuinely first (GET /v1/health, harmless) when the kind needs it."""
    method, target = rng.choice(ENDPOINTS)
    payload = body if method == "POST" else b""
    kind = rng.choice(["unsigned", "wrong secret", "random signature", "stale", "future", "bad timestamp",
                       "replayed here", "replayed to another agent", "tampered path", "tampered query",
                       "tampered body", "malformed header", "missing header"])
    h = signed(alpha, method, target, payload)
    if kind == "unsigned":
        h = {}
    elif kind == "wrong secret":
        h = signed(alpha, method, target, payload, secret=new_secret())
    elif kind == "random signature":
        h[HEADER_SIG] = "%064x" % rng.getrandbits(256)
    elif kind in ("stale", "future", "bad timestamp"):
        now = int(time.time())
        stamp = {"stale": str(now - rng.randint(31, 10**7)), "future": str(now + rng.randint(31, 10**7)),
                 "bad timestamp": rng.choice(["nan", "NaN", "inf", "-1", "1e9", f"{now}.5", "", "1 2", "0x10",
                                              "١٢٣", str(10**13)])}[kind]
        h = resigned(h, method, target, payload, alpha, stamp)
    elif kind == "replayed here":
        method, target, payload = "GET", "/v1/health", b""
        h = signed(alpha, method, target)
        assert send(client, alpha, method, target, h).status_code == 200
    elif kind == "replayed to another agent":
        return kind, beta, method, target, h, payload  # signed for alpha, never sent to it
    elif kind == "tampered path":
        other = rng.choice([e for e in ENDPOINTS if e[0] == method and e[1] != target])
        return kind, alpha, method, other[1], h, payload
    elif kind == "tampered query":
        return kind, alpha, method, f"{target}?{rng.choice(['all=1', 'x', 'launch_id=fuzz', '%00'])}", h, payload
    elif kind == "tampered body":
        payload = flip(rng, payload or b"{}")
        method = "POST"
        target = "/v1/launch"
    elif kind == "malformed header":
        name = rng.choice([HEADER_SIG, HEADER_NONCE, HEADER_TIME, HEADER_RECEIVER])
        h = {**h, name: rng.choice(["é" * 64, "\u2603", "ÿ" * 32, "x\x80", "a" * 200])}
    elif kind == "missing header":
        h.pop(rng.choice([HEADER_SIG, HEADER_NONCE, HEADER_TIME, HEADER_RECEIVER]))
    return kind, alpha, method, target, h, payload


def resigned(h: dict, method: str, target: str, body: bytes, agent, stamp: str) -> dict:
    from llmd.app.security import request_signature

    return {**h, HEADER_TIME: stamp,
            HEADER_SIG: request_signature(SECRET, method, target, receiver(agent), stamp, h[HEADER_NONCE], body)}


def flip(rng: random.Random, body: bytes) -> bytes:
    i = rng.randrange(len(body))
    return body[:i] + bytes([body[i] ^ (1 << rng.randrange(7))]) + body[i + 1:]


def test_no_request_without_a_valid_signature_is_obeyed(agents, launch):
    alpha, beta = agents
    rng, body = random.Random(12), json.dumps(launch).encode()
    statuses, kinds = Counter(), Counter()
    with nodelay_client(10) as client:
        for _ in range(1300):
            kind, agent, method, target, headers, payload = bad_requests(rng, alpha, beta, body, client)
            r = send(client, agent, method, target, headers, payload)
            kinds[kind] += 1
            statuses[r.status_code] += 1
            assert r.status_code == 401, (kind, method, target, r.status_code, r.text)
            assert body not in r.content
    print(f"\nauthentication fuzz: {sum(kinds.values())} requests, {dict(sorted(kinds.items()))}; "
          f"statuses {dict(statuses)}; obeyed 0")
    assert len(kinds) == 13 and min(kinds.values()) >= 50
    assert nothing_running(alpha) and nothing_running(beta)


def garbage_bodies(rng: random.Random, launch: dict):
    """Signed bodies that are not a launch an agent can run: (kind, body)."""
    def mutated(**changes):
        return json.dumps({**launch, **changes}).encode()

    plan = launch["plan"]
    choices = {
        "random bytes": lambda: rng.randbytes(rng.randrange(1, 3000)),
        "invalid UTF-8": lambda: b'{"launch_id": "\xff\xfe\xc3", "model": "\xed\xa0\x80"}',
        "not JSON": lambda: rng.choice([b"launch please", b"{", b"[1,2", b"\x00" * 40, b"null", b"'x'"]),
        "wrong type": lambda: json.dumps(rng.choice([1, "x", [launch], None, True, 1.5, {"launch": launch}])).encode(),
        "wrongly typed field": lambda: mutated(**{rng.choice(list(launch)): rng.choice([[], {}, None, -1, 1e308])}),
        "NaN and Infinity": lambda: json.dumps({**launch, "timeout_s": rng.choice([float("nan"), float("inf")])}).encode(),
        "deeply nested": lambda: (lambda n: b"[" * n + b"]" * n)(rng.choice([1000, 20000, 200000])),
        "deep plan": lambda: mutated(plan=(lambda n: json.loads("[" * n + "]" * n))(rng.choice([100, 900]))),
        "huge": lambda: mutated(model="m" * rng.choice([10_000, 900_000, 2 * MAX_CONTROL_BODY])),
        "lone surrogate": lambda: mutated(model="\ud800", launch_id="\udfff"),
        "extra field": lambda: mutated(shell="rm -rf /"),
        "duplicate ranks": lambda: mutated(ranks=[{"rank": 1, "device": "cpu"}] * 2),
        "more devices than offered": lambda: mutated(ranks=[{"rank": r, "device": "cpu"} for r in (1, 2, 3, 3)]),
        "rank outside the world": lambda: mutated(ranks=[{"rank": rng.choice([2, 7, 4096]), "device": "cpu"}]),
        "rank 0": lambda: mutated(ranks=[{"rank": 0, "device": "cpu"}]),
        "device not offered": lambda: mutated(ranks=[{"rank": 1, "device": "cuda:0"}]),
        "unknown model": lambda: mutated(model=rng.choice(["/nonexistent", "/etc", "../../x", "/dev/zero"])),
        "a GGUF to convert": lambda: mutated(model="/tmp/huge.gguf"),
        "bad plan": lambda: mutated(plan=rng.choice([{}, {"ranks": "x"}, {**plan, "ranks": plan["ranks"][::-1]},
                                                     {**plan, "stages": []}, {**plan, "epoch": "NaN"}])),
        "context over the model's": lambda: mutated(context=10**6),
        "bad address": lambda: mutated(master_addr=rng.choice(["evil.example", "1.2.3", "::g", "x" * 45])),
        "bad launch id": lambda: mutated(launch_id=rng.choice(["../x", "", "a b", "x" * 65])),
    }
    kind = rng.choice(sorted(choices))
    return kind, choices[kind]()


def test_signed_garbage_gets_a_4xx_never_a_5xx_and_starts_nothing(agents, launch):
    alpha, _ = agents
    rng = random.Random(7)
    statuses, kinds = Counter(), Counter()
    with nodelay_client(30) as client:
        for _ in range(1100):
            kind, body = garbage_bodies(rng, launch)
            target = "/v1/stop" if kind in ("random bytes", "not JSON", "wrong type") and rng.random() < 0.3 else \
                "/v1/launch"
            kinds[kind] += 1
            try:
                r = send(client, alpha, "POST", target, signed(alpha, "POST", target, body), body)
            except (httpx.ReadError, httpx.WriteError):
                # Over the cap the agent answers 413 and closes at once, often before the client, still
                # sending, reads the answer.
                assert len(body) > MAX_CONTROL_BODY, kind
                statuses["413 or reset"] += 1
                continue
            statuses[r.status_code] += 1
            assert 400 <= r.status_code < 500, (kind, r.status_code, r.text[:300])
            assert set(r.json()) == {"error"}, (kind, r.text[:300])
    print(f"\nsigned-body fuzz: {sum(kinds.values())} requests over {len(kinds)} kinds; statuses {dict(statuses)}; "
          "5xx 0")
    assert min(kinds.values()) >= 20
    assert nothing_running(alpha)
    health = send(httpx.Client(), alpha, "GET", "/v1/health", signed(alpha, "GET", "/v1/health"))
    assert health.status_code == 200 and health.json()["ok"]


def test_a_refused_launch_names_why(agents, launch):
    alpha, _ = agents
    cases = {"name a rank twice": [{"rank": 1, "device": "cpu"}] * 2,
             "not 4 x cpu": [{"rank": r, "device": "cpu"} for r in (1, 2, 3, 4)],
             "not all within 1..1": [{"rank": 5, "device": "cpu"}]}
    with httpx.Client(timeout=30) as client:
        for why, ranks in cases.items():
            body = json.dumps({**launch, "ranks": ranks}).encode()
            r = send(client, alpha, "POST", "/v1/launch", signed(alpha, "POST", "/v1/launch", body), body)
            assert r.status_code == 400 and why in r.json()["error"], r.text
    assert nothing_running(alpha)


class Impostor(BaseHTTPRequestHandler):
    """Answers like an agent, without the secret, and keeps what it is sent."""

    captured: list = []

    def do_GET(self):
        self.captured.append((self.command, self.path, dict(self.headers), b""))
        answer = json.dumps({"ok": True, "agent_id": "x", "name": "impostor", "version": "0", "devices": ["cpu"],
                             "device_free_mb": [10**6], "workers": [], "started": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_an_impostor_is_refused_and_what_it_captures_is_worthless(agents):
    alpha, beta = agents
    server = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    zc = open_zeroconf("127.0.0.1")
    # It even claims alpha's agent id: the host's requests still name the impostor's address.
    advert = Advert(agent_id=alpha.agent_id, name="impostor", version="0", devices="cpu:1", device_count=1,
                    free_mb=10**6, address="127.0.0.1", port=server.server_address[1])
    advertiser = Advertiser(zc, advert)
    advertiser.register()
    try:
        with Host(SECRET, "127.0.0.1") as host:
            host.wait_for_peers(2, timeout_s=15)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not [s for s in host.peers() if s.health == "refused"]:
                host.refresh()
                time.sleep(0.2)
            health = {s.peer.advert.name: s.health for s in host.peers()}
            assert health == {"alpha": "ok", "beta": "ok", "impostor": "refused"}, health
            with pytest.raises(AgentRefused, match="did not prove it holds the pool secret"):
                host.join("impostor")
            assert not [s for s in host.peers() if s.joined]
        assert Impostor.captured, "the host never asked the impostor anything"
        with httpx.Client(timeout=10) as client:
            for method, path, headers, body in Impostor.captured[-5:]:
                for agent in (alpha, beta):
                    r = send(client, agent, method, path, {k: v for k, v in headers.items() if k.startswith("X-")})
                    assert r.status_code == 401 and r.json()["error"] == "addressed to another receiver", r.text
    finally:
        advertiser.unregister()
        zc.close()
        server.shutdown()
        server.server_close()


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def push(agent, head: bytes, total: int, chunked: bool = False) -> bytes:
    """Send `head`, then up to `total` bytes of body, until the agent answers; the start of its answer."""
    with socket.create_connection((agent.address, agent.port), timeout=30) as s:
        s.sendall(head)
        chunk, sent = b"\0" * (1 << 20), 0
        if chunked:
            chunk = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        s.setblocking(False)
        while sent < total:
            try:
                answer = s.recv(4096)
                if answer:
                    return answer
            except BlockingIOError:
                pass
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        return s.recv(4096)


def test_a_gigabyte_unsigned_body_is_refused_before_it_is_read(agents):
    alpha, _ = agents
    gib = 1 << 30
    for _ in range(3):  # warm the paths the refusals take, so the peak below measures the bodies alone
        push(alpha, b"POST /v1/launch HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n", 2_000_000)
    before = peak_rss_kb(alpha.proc.pid)
    declared = push(alpha, b"POST /v1/launch HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % gib, gib)
    chunked = push(alpha, b"POST /v1/launch HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", gib,
                   chunked=True)
    grown_kb = peak_rss_kb(alpha.proc.pid) - before
    print(f"\n1 GiB bodies: agent peak memory {before / 1024:.0f} MiB before, grew {grown_kb} KiB "
          f"(cap {MAX_CONTROL_BODY >> 10} KiB)")
    assert declared.startswith(b"HTTP/1.1 413") and chunked.startswith(b"HTTP/1.1 411")
    assert grown_kb < MAX_CONTROL_BODY >> 10
    assert nothing_running(alpha)


def test_slow_clients_are_dropped(agents):
    alpha, _ = agents
    starts = [b"GET /v1/health HTTP/1.1\r\nHost: a\r\n",  # headers never finished
              b"POST /v1/launch HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"]  # a body that never ends
    socks = []
    for i in range(40):
        s = socket.create_connection((alpha.address, alpha.port), timeout=5)
        s.sendall(starts[i % 2])
        socks.append(s)
    deadline = time.monotonic() + max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 20
    open_socks = list(socks)
    while open_socks and time.monotonic() < deadline:
        for s in list(open_socks):
            try:
                s.sendall(b"x")  # a byte now and then keeps a plain idle timeout from firing
                s.settimeout(0.05)
                if s.recv(4096) is not None:
                    open_socks.remove(s)
            except TimeoutError:
                pass
            except OSError:
                open_socks.remove(s)
        time.sleep(1.0)
    for s in socks:
        s.close()
    assert not open_socks, f"{len(open_socks)} of {len(socks)} slow connections still open"
    with httpx.Client() as client:
        assert send(client, alpha, "GET", "/v1/health", signed(alpha, "GET", "/v1/health")).status_code == 200
