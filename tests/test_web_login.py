"""With --listen, the page asks for a login (an API key under its name) and the API for a key: a real
`llmd up` bound to an address, plain HTTP."""

import subprocess
import sys

import httpx
import pytest

from agents import new_secret
from netns import stop
from ui_helpers import start_up


@pytest.fixture(scope="module")
def listening(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listen")
    key = subprocess.run([sys.executable, "-m", "llmd", "keys", "create", "carol", "--db", str(tmp / "llmd.db")],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    server = start_up(tmp, new_secret(), "--listen", "--workers", "1", "--compile", "off", "--context", "128")
    try:
        yield server, key
    finally:
        stop(server.proc, timeout=45)


def test_keys_create_prints_the_key_alone_on_its_last_line(listening):
    _, key = listening
    assert key.startswith("llmd-") and " " not in key


def test_the_page_needs_a_login_with_a_key(listening):
    server, key = listening
    with httpx.Client(base_url=server.url, timeout=30) as web:
        assert web.get("/config").status_code == 401  # nothing of the page's state without a login
        refused = web.post("/login", data={"username": "carol", "password": "llmd-wrong"})
        assert refused.status_code >= 400 and web.get("/config").status_code == 401
        wrong_name = web.post("/login", data={"username": "mallory", "password": key})
        assert wrong_name.status_code >= 400
        assert web.post("/login", data={"username": "carol", "password": key}).status_code == 200
        assert web.get("/config").status_code == 200


def test_the_api_needs_the_key_when_listening(listening):
    server, key = listening
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    ok = httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["object"] == "list"
