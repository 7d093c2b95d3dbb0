"""The pool secret and the request verifier, without a network."""

import stat
import time

import pytest

from llmd.app.security import (HEADER_NONCE, HEADER_SIG, HEADER_TIME, SecretMissing, Verifier, load_or_create_secret,
                               read_secret, signed_headers)


def test_the_host_creates_its_secret_once_readable_only_by_its_owner(tmp_path):
    path = tmp_path / "llmd" / "pool.secret"
    first = load_or_create_secret(path)
    assert len(first) == 64 and load_or_create_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_agents_read_the_secret_from_a_file_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "s").write_text("abc\n")
    assert read_secret(str(tmp_path / "s")) == "abc"
    monkeypatch.setenv("LLMD_POOL_SECRET", "xyz")
    assert read_secret(None) == "xyz"
    monkeypatch.delenv("LLMD_POOL_SECRET")
    with pytest.raises(SecretMissing, match="LLMD_POOL_SECRET"):
        read_secret(None)


def test_verifier_accepts_once_and_names_every_refusal():
    v = Verifier("secret", window_s=30)
    h = signed_headers("secret", "POST", "/v1/launch", b"{}")
    assert v.check("POST", "/v1/launch", h, b"{}") is None
    assert v.check("POST", "/v1/launch", h, b"{}") == "replayed request"
    assert v.check("POST", "/v1/launch", {}, b"{}") == "unsigned request"
    assert v.check("POST", "/v1/stop", signed_headers("secret", "POST", "/v1/launch", b"{}"), b"{}") == "bad signature"
    assert v.check("POST", "/v1/launch", signed_headers("other", "POST", "/v1/launch", b"{}"), b"{}") == "bad signature"
    old = signed_headers("secret", "GET", "/v1/health")
    old[HEADER_TIME] = f"{time.time() - 31:.3f}"
    assert v.check("GET", "/v1/health", old, b"").startswith("stale")
    assert {HEADER_TIME, HEADER_NONCE, HEADER_SIG} <= set(h)

