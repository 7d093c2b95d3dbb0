"""The host's one HTTP server: the OpenAI-compatible API under /v1 and the web UI at /, on one port.

`ui/` hands in a function that mounts its page on the app (app/ never imports ui/); everything in
front of both (host names, origins, body caps) is app/guard.py's `OwnSite`.
"""

from collections.abc import Callable

from fastapi import FastAPI

from .api import API_AREA, ApiAuth, add_api
from .guard import OwnSite
from .pool import Pool

BLOCKED = ("/gradio_api/upload", "/upload")  # the page takes no files


def build_site(pool: Pool, port: int, listen: bool, address: str,
               mount_ui: Callable[[FastAPI], FastAPI]) -> OwnSite:
    app = FastAPI(title="llmd", openapi_url=None, docs_url=None, redoc_url=None)
    add_api(app, pool, ApiAuth(pool.store, listen))
    app = mount_ui(app)
    hosts = ["127.0.0.1", "localhost", *([address] if listen else [])]
    return OwnSite(app, hosts, port, blocked=BLOCKED, areas=(API_AREA,))
