"""The pool secret, and control messages signed at both ends.

A request carries an HMAC-SHA256 over its method, path with query, receiver, timestamp, nonce and
body, made with the pool secret. The receiver is who is meant and where: `ID@ADDRESS:PORT`, the
agent's id (or a launch's) and the address it listens on, so a request captured on its way to one
receiver, or to an impostor that claims its id, is refused by every other. The receiver refuses
an unsigned, malformed, wrongly signed, misaddressed, stale (outside the replay window) or replayed
(nonce seen) request before acting on it. Its answer is signed over the request's nonce and the
SHA-256 of its body, so the sender trusts only a receiver that holds the secret, and an answer cannot
be replayed either. (Over the body's hash, not the body: an agent fetching model slices hashes each
once, and that one hash both proves the answer and names the chunk in its cache.)
"""

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmd.engine.errors import LlmdError

REPLAY_WINDOW_S = 30
HEADER_TIME, HEADER_NONCE = "X-Llmd-Timestamp", "X-Llmd-Nonce"
HEADER_RECEIVER, HEADER_SIG = "X-Llmd-Receiver", "X-Llmd-Signature"
HEADER_ANSWER = "X-Llmd-Answer-Signature"
# What a well-formed header holds: anything else is refused before any work (and never echoed).
FORMATS = {HEADER_TIME: re.compile(r"[0-9]{1,12}"), HEADER_NONCE: re.compile(r"[0-9a-f]{32}"),
           HEADER_RECEIVER: re.compile(r"[A-Za-z0-9_-]{1,64}@[0-9A-Fa-f.:\[\]]{2,47}:[0-9]{1,5}"), HEADER_SIG: re.compile(r"[0-9a-f]{64}")}


class SecretMissing(LlmdError): ...


def receiver_name(receiver_id: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{receiver_id}@{host}:{port}"


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "llmd"


def load_or_create_secret(path: Path | None = None) -> str:
    """The host's pool secret, created (mode 0600) on first start."""
    path = path or data_dir() / "pool.secret"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def read_secret(secret_file: str | None) -> str:
    """An agent's or client's secret: --secret-file, else $LLMD_POOL_SECRET."""
    if secret_file:
        try:
            secret = Path(secret_file).read_text().strip()
        except OSError as e:
            raise SecretMissing(f"cannot read the pool secret from {secret_file}: {e.strerror}") from None
    else:
        secret = os.environ.get("LLMD_POOL_SECRET", "").strip()
    if not secret:
        raise SecretMissing("no pool secret: pass --secret-file or set LLMD_POOL_SECRET (the host shows it)")
    return secret


def _mac(secret: str, *fields: str, body: bytes) -> str:
    message = "\n".join(fields).encode() + b"\n" + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def request_signature(secret: str, method: str, target: str, receiver: str, timestamp: str, nonce: str,
                      body: bytes) -> str:
    """`target` is the path with its query string, as sent."""
    return _mac(secret, "llmd-request", method.upper(), target, receiver, timestamp, nonce, body=body)


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def answer_signature(secret: str, status: int, receiver: str, nonce: str, digest: str) -> str:
    """`digest`: the answer body's `body_digest`."""
    return _mac(secret, "llmd-answer", str(status), receiver, nonce, digest, body=b"")


def signed_headers(secret: str, method: str, target: str, receiver: str, body: bytes = b"") -> dict[str, str]:
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
    return {HEADER_TIME: timestamp, HEADER_NONCE: nonce, HEADER_RECEIVER: receiver,
            HEADER_SIG: request_signature(secret, method, target, receiver, timestamp, nonce, body)}


def answer_is_genuine(secret: str, request_headers: dict[str, str], status: int, answer_headers,
                      body: bytes, digest: str | None = None) -> bool:
    """Whether an answer was signed, with the secret, for this very request (`digest`: the body's, when
    the caller has it already)."""
    sig = answer_headers.get(HEADER_ANSWER, "")
    expected = answer_signature(secret, status, request_headers[HEADER_RECEIVER], request_headers[HEADER_NONCE],
                                digest or body_digest(body))
    return bool(FORMATS[HEADER_SIG].fullmatch(sig)) and hmac.compare_digest(expected, sig)


@dataclass(frozen=True)
class Verdict:
    """A checked request: `why` it is refused, or the nonce its answer is signed over."""

    why: str | None
    nonce: str = ""


class Verifier:
    """Checks requests addressed to `receiver` and remembers the nonces of the replay window."""

    def __init__(self, secret: str, receiver: str, window_s: int = REPLAY_WINDOW_S):
        self.secret, self.receiver, self.window_s = secret, receiver, window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Verdict:
        """`headers`: names in lower case, values as text."""
        values = {name: headers.get(name.lower(), "") for name in FORMATS}
        if not any(values.values()):
            return Verdict("unsigned request")
        bad = [name for name, pattern in FORMATS.items() if not pattern.fullmatch(values[name])]
        if bad:
            return Verdict(f"malformed {', '.join(bad)} header")
        if abs(time.time() - int(values[HEADER_TIME])) > self.window_s:
            return Verdict("stale request (outside the replay window)")
        expected = request_signature(self.secret, method, target, values[HEADER_RECEIVER], values[HEADER_TIME],
                                     values[HEADER_NONCE], body)
        if not hmac.compare_digest(expected, values[HEADER_SIG]):
            return Verdict("bad signature")
        if values[HEADER_RECEIVER] != self.receiver:
            return Verdict("addressed to another receiver")
        with self._lock:
            now = time.time()
            self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * self.window_s}
            if values[HEADER_NONCE] in self._seen:
                return Verdict("replayed request")
            self._seen[values[HEADER_NONCE]] = now
        return Verdict(None, values[HEADER_NONCE])

    def sign_answer(self, status: int, nonce: str, body: bytes) -> str:
        return answer_signature(self.secret, status, self.receiver, nonce, body_digest(body))
