"""Who may change the pool from the page: the holder of the admin link printed when llmd starts.

Anyone who can open the page may chat. Revealing the pool secret, joining, dropping, relaunching and
changing prices need an admin session, even on loopback, so that another user of this machine or a
web page in the user's own browser cannot do them. The link carries a token made at each start
(never stored); opening it sets an HttpOnly, SameSite=Strict cookie naming a session of this process.
"""

import hmac
import secrets
import threading
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse

COOKIE = "llmd-admin"
REFUSED = "Admin only: open the admin link that llmd printed where it runs (its console or log)."


@dataclass
class Admin:
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _sessions: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def link(self, url: str) -> str:
        return f"{url}/admin?token={self.token}"

    def open_session(self, token: str) -> str | None:
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return None
        session = secrets.token_urlsafe(24)
        with self._lock:
            self._sessions.add(session)
        return session

    def allows(self, request) -> bool:
        """Whether this request (a Gradio or Starlette one) comes from an admin session."""
        cookies = getattr(request, "cookies", None) or {}
        session = cookies.get(COOKIE, "")
        with self._lock:
            return any(hmac.compare_digest(session.encode(), s.encode()) for s in self._sessions)


def add_login(app: FastAPI, admin: Admin) -> None:
    @app.get("/admin")
    def login(request: Request, token: str = ""):
        session = admin.open_session(token[:200])
        if session is None:
            return PlainTextResponse("not a valid admin link (it changes each time llmd starts)", status_code=403)
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/")
        return answer
