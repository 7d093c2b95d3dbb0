"""With --listen, the page asks for a login (an API key under its name) and the API for a key: the site
`llmd up --listen` serves, in this process on loopback, over a pool that has no model yet (a login needs none)."""

import subprocess
import sys

import httpx
import pytest

from llmd.app.guard import ThreadServer
from llmd.app.pool import Pool
from llmd.ui.admin import Admin
from llmd.ui.commands import make_site
from test_pool import make_pool


@pytest.fixture(scope="module")
def listening(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listen")
    out = subprocess.run([sys.executable, "-m", "llmd", "keys", "create", "carol", "--db", str(tmp / "llmd.db")],
                         capture_output=True, text=True, check=True)
    key = out.stdout.strip().splitlines()[-1]
    pool: Pool = make_pool(tmp, workers=1)  # the same store file; never launched
    server = ThreadServer("127.0.0.1", 0)
    server.start(make_site(pool, Admin(), server.port, "127.0.0.1", listen=True, max_new_tokens=16))
    try:
        yield f"http://127.0.0.1:{server.port}", key, out.stderr
    finally:
        server.close()
        pool.store.close()


def test_keys_create_prints_the_key_alone_on_its_last_line(listening):
    _, key, note = listening
    assert key.startswith("llmd-") and " " not in key and "shown once" in note


def test_the_page_needs_a_login_with_a_key(listening):
    url, key, _ = listening
    with httpx.Client(base_url=url, timeout=30) as web:
        assert web.get("/config").status_code == 401  # nothing of the page's state without a login
        refused = web.post("/login", data={"username": "carol", "password": "llmd-wrong"})
        assert refused.status_code >= 400 and web.get("/config").status_code == 401
        assert web.post("/login", data={"username": "mallory", "password": key}).status_code >= 400
        assert web.post("/login", data={"username": "carol", "password": key}).status_code == 200
        assert web.get("/config").status_code == 200


def test_the_api_needs_the_key_when_listening(listening):
    url, key, _ = listening
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    ok = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert ok.status_code == 200 and ok.json() == {"object": "list", "data": []}  # no model yet
    busy = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert busy.status_code == 503 and "not ready" in busy.json()["error"]["message"]


def test_only_the_admin_session_makes_and_revokes_keys_from_the_page(tmp_path):
    from types import SimpleNamespace

    from llmd.ui.admin import COOKIE, REFUSED
    from llmd.ui.wiring import Handlers

    pool, admin = make_pool(tmp_path, workers=1), Admin()
    h = Handlers(pool, admin)
    stranger = SimpleNamespace(cookies={})
    boss = SimpleNamespace(cookies={COOKIE: admin.open_session(admin.token)})
    try:
        assert h.create_key("dave", stranger)[1] == REFUSED and pool.keys() == []
        table, note = h.create_key("dave", boss)
        key = note.split("`")[1]
        assert list(table["name"]) == ["dave"] and pool.login("dave", key)  # shown once, and it works
        assert h.revoke_key("dave", stranger)[1] == REFUSED and pool.login("dave", key)
        assert "Revoked" in h.revoke_key("dave", boss)[1] and not pool.login("dave", key)
        assert "No key made" in h.create_key("not a name!", boss)[1]
    finally:
        pool.store.close()
