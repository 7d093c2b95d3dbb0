"""A real `llmd up` and a real headless Chromium for the web UI tests."""

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from netns import stop, wait_for_output

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@dataclass
class Up:
    proc: subprocess.Popen
    url: str
    admin_link: str  # printed on its console: opens an admin session in the browser that follows it
    children: list[psutil.Process]  # what it started, checked to be gone after it stops


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        raise AssertionError("the web UI tests need Playwright for Python: pip install -e '.[test]'") from None
    return start()


def chromium_path() -> str:
    """The system's Chromium; a missing one fails the test, since CI installs it."""
    for candidate in (os.environ.get("LLMD_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("the web UI tests need Chromium: install it (Debian/Ubuntu: `apt-get install chromium`) "
                         "or point LLMD_CHROMIUM at its binary")


@contextmanager
def browser_page(url: str) -> Iterator:
    """A page of a headless Chromium at `url`, closed with its browser on the way out."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def start_up(tmp: Path, secret: str, *extra: str) -> Up:
    env = dict(os.environ, LLMD_POOL_SECRET=secret, XDG_DATA_HOME=str(tmp / "data"), LLMD_DB=str(tmp / "env.db"))
    argv = [sys.executable, "-u", "-m", "llmd", "up", "--port", "0", "--db", str(tmp / "llmd.db"),
            "--address", "127.0.0.1", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        # Printed just after "llmd: UI at URL"; one read may hold both lines.
        admin_link = wait_for_output(proc, r"^llmd: admin link .*: (http://\S+)$", timeout=120).group(1)
        url = admin_link.split("/admin?", 1)[0]
    except BaseException:
        stop(proc)
        raise
    return Up(proc, url, admin_link, [])


def remember_children(up: Up) -> None:
    up.children = psutil.Process(up.proc.pid).children(recursive=True)


def stop_up(up: Up) -> list[str]:
    """SIGTERM, as Ctrl-C would; returns the command lines of any child left running."""
    if not up.children:
        remember_children(up)
    stop(up.proc, timeout=45)
    _, alive = psutil.wait_procs(up.children, timeout=10)  # a child may take a moment to see its parent gone
    left = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    names = [" ".join(c.cmdline()[:4]) for c in left]
    for c in left:
        c.kill()
    return names


def wait_text(page, selector: str, pattern: str, timeout_s: float = 60.0) -> str:
    """The selector's text once it matches `pattern` (a regex)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        element = page.query_selector(selector)
        text = element.inner_text() if element else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{selector} never matched {pattern!r}; it shows: {text[:500]!r}")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def table_rows(page, selector: str) -> list[str]:
    """Each body row of a Gradio Dataframe (virtualised: rows are divs), its cells joined by tabs."""
    rows = page.query_selector_all(f"{selector} [role=row].virtual-row")
    return ["\t".join(c.inner_text().strip() for c in r.query_selector_all("[role=gridcell]")) for r in rows]


def plot_has_points(page, selector: str) -> bool:
    """A Gradio (Vega) line plot has drawn at least one line or point."""
    marks = page.query_selector_all(f"{selector} g.mark-line path, {selector} g.mark-symbol path")
    return any((m.get_attribute("d") or "").strip() for m in marks)


def wait_for(check, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def call_event(url: str, api_name: str, data: list, cookies=None, session: str = "probe") -> list:
    """Run one of the page's events as a crafted HTTP client would (Gradio's queue protocol, no browser):
    the outputs it returns."""
    import json

    import httpx

    with httpx.Client(base_url=url, cookies=cookies, timeout=30) as client:
        config = client.get("/config").json()
        dep = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
        joined = client.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": dep["id"], "trigger_id": dep["targets"][0][0] if dep["targets"] else None,
            "session_hash": session, "event_data": None})
        assert joined.status_code == 200, joined.text
        with client.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    assert message["success"], message
                    return message["output"]["data"]
    raise AssertionError(f"{api_name} never completed")
