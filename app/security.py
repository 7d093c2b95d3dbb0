"""The pool secret and signed control requests.

Every control request carries an HMAC-SHA256 over its method, path, timestamp,
nonce and body, made with the pool secret. The receiver refuses an unsigned,
wrongly signed, stale (outside the replay window) or replayed (nonce seen)
request before acting on it.
"""

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from llmd.engine.errors import LlmdError

REPLAY_WINDOW_S = 30.0
HEADER_TIME, HEADER_NONCE, HEADER_SIG = "X-Llmd-Timestamp", "X-Llmd-Nonce", "X-Llmd-Signature"


class SecretMissing(LlmdError): ...


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


def signature(secret: str, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    message = f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    timestamp, nonce = f"{time.time():.3f}", secrets.token_hex(16)
    return {HEADER_TIME: timestamp, HEADER_NONCE: nonce,
            HEADER_SIG: signature(secret, method, path, timestamp, nonce, body)}


class Verifier:
    """Checks signatures and remembers the nonces of the replay window."""

    def __init__(self, secret: str, window_s: float = REPLAY_WINDOW_S):
        self.secret, self.window_s = secret, window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, method: str, path: str, headers, body: bytes) -> str | None:
        """None when the request may proceed, else why it may not."""
        timestamp, nonce, sig = headers.get(HEADER_TIME), headers.get(HEADER_NONCE), headers.get(HEADER_SIG)
        if not (timestamp and nonce and sig):
            return "unsigned request"
        try:
            age = time.time() - float(timestamp)
        except ValueError:
            return "bad timestamp"
        if abs(age) > self.window_s:
            return "stale request (outside the replay window)"
        expected = signature(self.secret, method, path, timestamp, nonce, body)
        if not hmac.compare_digest(expected, sig):
            return "bad signature"
        with self._lock:
            now = time.time()
            self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * self.window_s}
            if nonce in self._seen:
                return "replayed request"
            self._seen[nonce] = now
        return None
