"""The pool secret, and signing at both ends, without a network."""

import stat
import time

import pytest

from llmd.app.security import (HEADER_ANSWER, HEADER_NONCE, HEADER_RECEIVER, HEADER_SIG, HEADER_TIME, SecretMissing,
                               Verifier, answer_is_genuine, load_or_create_secret, read_secret, receiver_name,
                               signed_headers)

A, B = receiver_name("agent-a", "10.0.0.1", 4000), receiver_name("agent-b", "10.0.0.2", 4000)
A_ELSEWHERE = receiver_name("agent-a", "10.0.0.9", 4000)  # what an impostor claiming agent-a's id is sent


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


def lower(headers: dict) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def test_the_verifier_accepts_once_and_names_every_refusal():
    v = Verifier("secret", receiver=A, window_s=30)
    h = signed_headers("secret", "POST", "/v1/launch", A, b"{}")
    assert v.check("POST", "/v1/launch", lower(h), b"{}").why is None
    assert v.check("POST", "/v1/launch", lower(h), b"{}").why == "replayed request"
    assert v.check("POST", "/v1/launch", {}, b"{}").why == "unsigned request"
    refusals = {
        "bad signature": [("POST", "/v1/stop", signed_headers("secret", "POST", "/v1/launch", A, b"{}"), b"{}"),
                          ("POST", "/v1/launch", signed_headers("other", "POST", "/v1/launch", A, b"{}"), b"{}"),
                          ("POST", "/v1/launch", signed_headers("secret", "POST", "/v1/launch", A, b"{}"), b"{ }"),
                          ("GET", "/v1/workers?all=1", signed_headers("secret", "GET", "/v1/workers", A), b"")],
        "addressed to another receiver": [("GET", "/v1/health", signed_headers("secret", "GET", "/v1/health", r), b"")
                                          for r in (B, A_ELSEWHERE)],
    }
    for why, cases in refusals.items():
        for method, target, headers, body in cases:
            assert v.check(method, target, lower(headers), body).why == why
    old = signed_headers("secret", "GET", "/v1/health", A)
    old[HEADER_TIME] = str(int(time.time()) - 31)
    assert v.check("GET", "/v1/health", lower(old), b"").why.startswith("stale")


@pytest.mark.parametrize("header, value", [(HEADER_TIME, "nan"), (HEADER_TIME, "1e9"), (HEADER_TIME, "-5"),
                                           (HEADER_SIG, "é" * 64), (HEADER_NONCE, "x"), (HEADER_RECEIVER, "a b")])
def test_a_malformed_header_is_refused_before_any_signature_is_computed(header, value):
    v = Verifier("secret", receiver=A)
    h = signed_headers("secret", "GET", "/v1/health", A)
    h[header] = value
    assert v.check("GET", "/v1/health", lower(h), b"").why == f"malformed {header} header"


def test_an_answer_is_genuine_only_when_signed_for_this_request():
    v = Verifier("secret", receiver=A)
    request = signed_headers("secret", "GET", "/v1/health", A)
    nonce = v.check("GET", "/v1/health", lower(request), b"").nonce
    answer = {HEADER_ANSWER: v.sign_answer(200, nonce, b'{"ok":true}')}
    assert answer_is_genuine("secret", request, 200, answer, b'{"ok":true}')
    assert not answer_is_genuine("secret", request, 200, answer, b'{"ok":false}')
    assert not answer_is_genuine("secret", request, 201, answer, b'{"ok":true}')
    assert not answer_is_genuine("other", request, 200, answer, b'{"ok":true}')
    assert not answer_is_genuine("secret", signed_headers("secret", "GET", "/v1/health", A), 200, answer,
                                 b'{"ok":true}')  # another request's answer
    assert not answer_is_genuine("secret", request, 200, {}, b'{"ok":true}')
