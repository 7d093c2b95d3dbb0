"""The shared engine loop seen from the web page: a real `llmd up` (1 CPU worker, 4 KV slots, a 256-token
context) and a real headless Chromium.

Covers: a chat in the page and an OpenAI-client request decoded at the same time (both finish, the API's
greedy text is what it is alone); New chat during a reply (the reply stops at once, the chat box stays
empty, the journal says cancelled, a message sent right after New chat is answered alone); a chat that outgrows the context (its
oldest turns are left out, the page says so, every turn is answered).
"""

import json
import re
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from agents import new_secret
from netns import stop
from ui_helpers import browser_page, open_tab, screenshot, start_up, wait_for, wait_text

pytestmark = pytest.mark.slow  # a real `llmd up` and a browser

CONTEXT = 256
UI_TOKENS = 120  # the chat's reply beside the API request: long enough to still run when that one starts
BOT = "#chatbot .message.bot"  # one element per message (its [data-testid=bot] child would count it twice)
USER = "#chatbot .message.user"
PENDING = "Loading content"  # what a bot bubble reads while its message has no text yet
STORY = ("Write a very long and detailed story about a young dragon who learns to cook in a busy city "
         "restaurant. Describe every dish, every friend and every mistake along the way.")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    server = start_up(tmp, new_secret(), "--workers", "1", "--slots", "4", "--context", str(CONTEXT),
                      "--compile", "off", "--weights", "fp32")
    server.db = tmp / "llmd.db"
    try:
        yield server
    finally:
        stop(server.proc, timeout=45)


@pytest.fixture(scope="module")
def page(up):
    with browser_page(up.url) as page:
        wait_text(page, "#status", r"\bready\b", timeout_s=180)
        open_tab(page, "Chat")
        page.get_by_text("Generation settings").click()
        page.check("#greedy input")
        yield page


# ---- the page

def bot_texts(page) -> list[str]:
    return [b.inner_text().strip() for b in page.query_selector_all(BOT)]


def user_texts(page) -> list[str]:
    return [u.inner_text().strip() for u in page.query_selector_all(USER)]


def stats(page) -> str:
    return page.inner_text("#reply-stats")


def chat_box(page) -> tuple[list[str], list[str], str]:
    """The user messages, the replies and the stats line the page shows."""
    return user_texts(page), bot_texts(page), stats(page).strip()


def send(page, message: str, max_new_tokens: int) -> None:
    """Send a message; returns once its reply bubble is on the page and the stats line is no longer the
    last reply's (so a `wait_finished` after it waits for this reply)."""
    page.fill("#max-new-tokens input", str(max_new_tokens))
    before = len(page.query_selector_all(BOT)), stats(page)
    page.fill("#chat-input textarea", message)
    page.click("#send")
    wait_for(lambda: len(page.query_selector_all(BOT)) > before[0] and stats(page) != before[1], "the reply bubble")


def last_reply(page) -> str:
    """The last reply's text; "" while Gradio shows its placeholder for a reply with no text yet."""
    texts = bot_texts(page)
    return "" if not texts or texts[-1] == PENDING else texts[-1]


def wait_streaming(page) -> str:
    """The reply's first text, once the page shows some while it is still generating."""
    return wait_for(lambda: last_reply(page), "the reply's first text", timeout_s=120)


def wait_finished(page) -> str:
    """The stats line once the reply under way has ended, and its text is drawn."""
    line = wait_text(page, "#reply-stats", r"tokens/s|error", timeout_s=180)
    wait_for(lambda: last_reply(page), "the reply's text drawn")
    return line


def new_chat(page) -> None:
    page.click("#new-chat")
    wait_for(lambda: not page.query_selector_all(f"{BOT}, {USER}"), "an empty chat box")


# ---- the store

def journal(up, where: str = "1", params: tuple = ()) -> list[dict]:
    """Rows of the `requests` table, oldest first (read beside the running server: the store is WAL)."""
    db = sqlite3.connect(f"file:{Path(up.db)}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM requests WHERE {where} ORDER BY created, rowid", params)]
    finally:
        db.close()


def latest(up, user: str = "web") -> dict:
    return journal(up, "user = ?", (user,))[-1]


def client(up) -> OpenAI:
    return OpenAI(base_url=up.url + "/v1", api_key="none", max_retries=0, timeout=180)


# ---- the tests

def test_a_chat_and_an_api_request_are_decoded_together(page, up):
    question = [{"role": "user", "content": "Tell me about the moon in a few sentences."}]
    new_chat(page)
    send(page, STORY, max_new_tokens=UI_TOKENS)
    first = wait_streaming(page)
    ui = latest(up)
    # The API request must go while the page's reply still runs: it is checked just before, early on in
    # a reply far longer than the few words shown so far (a greedy story does not end this soon).
    assert ui["status"] == "running" and "tokens/s" not in stats(page), (ui, stats(page))
    assert len(first.split()) < UI_TOKENS // 4, first

    streamed: dict = {}

    def stream():
        try:
            chunks = client(up).chat.completions.create(model="default", messages=question, temperature=0,
                                                        max_tokens=20, stream=True)
            streamed["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except BaseException as e:  # reported by the test thread below
            streamed["error"] = e

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the streamed API request never ended"
    assert "error" not in streamed, streamed.get("error")
    assert streamed["text"].strip()

    finished = wait_finished(page)
    assert "tokens/s" in finished and "error" not in finished, finished
    assert bot_texts(page)[-1]
    screenshot(page, "chat-beside-api")

    alone = client(up).chat.completions.create(model="default", messages=question, temperature=0, max_tokens=20)
    assert streamed["text"] == alone.choices[0].message.content

    ui = wait_for(lambda: (r := journal(up, "id = ?", (ui["id"],))[0])["finished"] and r, "the chat journalled")
    api = journal(up, "user = 'api'")[0]  # the streamed one: the first API request of this server
    assert ui["status"] == "done" and api["status"] == "done", (ui, api)
    assert api["started"] < ui["finished"], "the API request did not run beside the chat"
    assert api["generated_tokens"] > 0


def test_new_chat_during_a_reply_stops_it_and_the_box_stays_empty(page, up):
    new_chat(page)
    for then_send in (False, True):
        send(page, STORY, max_new_tokens=200)
        wait_streaming(page)
        running = latest(up)
        assert running["status"] in ("queued", "running"), running
        page.click("#new-chat")
        try:
            wait_for(lambda: chat_box(page)[:2] == ([], []), "the chat box to empty", timeout_s=30)
        except AssertionError:
            raise AssertionError(f"New chat left the chat box showing {chat_box(page)}") from None
        if then_send:
            break
        row = wait_for(lambda: (r := journal(up, "id = ?", (running["id"],))[0])["status"] not in ("queued", "running")
                       and r, "the reply to end in the journal", timeout_s=30)
        assert row["status"] == "cancelled", row
        assert row["generated_tokens"] < min(200, CONTEXT - row["prompt_tokens"]), row
        for _ in range(12):  # the old reply, now ended, must not come back into the box
            assert chat_box(page) == ([], [], ""), f"the ended reply came back into the chat box: {chat_box(page)}"
            time.sleep(0.25)

    # Sent at once, while the reply New chat ended may still be winding down: answered, and alone in the box.
    send(page, "Name three colours.", max_new_tokens=24)
    finished = wait_finished(page)
    assert "tokens/s" in finished and "error" not in finished, finished
    assert len(user_texts(page)) == 1 and "Name three colours." in user_texts(page)[0], user_texts(page)
    assert len(bot_texts(page)) == 1 and bot_texts(page)[0], bot_texts(page)


def test_every_click_on_the_chat_buttons_counts_while_a_reply_is_pending(up):
    """Gradio drops a click while the same event is pending unless its trigger mode is "multiple": a
    message sent right after New chat or Stop would be lost while the ended reply winds down."""
    config = json.load(urllib.request.urlopen(f"{up.url}/config", timeout=30))
    elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    modes = {elem_ids.get(target): d["trigger_mode"] for d in config["dependencies"] for target, _ in d["targets"]}
    for button in ("send", "chat-input", "stop", "new-chat"):
        assert modes.get(button) == "multiple", (button, modes.get(button))


def test_a_chat_that_outgrows_the_context_leaves_out_its_oldest_turns(page, up):
    ask = ("I am planning a long trip through the mountains next summer with three friends, and we want "
           "to walk from village to village, sleep in small huts, cook our own food and carry everything "
           "on our backs. Please explain in great detail, step by step, everything we should pack, how we "
           "should train in the months before, what could go wrong on the way and how to stay safe, and "
           "give a long list of tips. We have never done anything like this before, so assume we know "
           "nothing at all and leave nothing out. Turn {n}.")
    new_chat(page)
    seen = []
    for n in range(1, 6):
        send(page, ask.format(n=n), max_new_tokens=24)
        line = wait_finished(page)
        assert "error" not in line and "tokens/s" in line, (n, line)
        assert len(bot_texts(page)) == n and bot_texts(page)[-1], (n, bot_texts(page))
        seen.append(line)
        if "left out" in line and n > 1 and "left out" not in seen[0]:  # answered, trimmed and answered again
            break
    assert any(re.search(r"the oldest \d+ message\(s\) were left out", s) for s in seen), seen
    assert len(user_texts(page)) == len(seen)  # the page keeps the whole chat; only the prompt is trimmed
    screenshot(page, "chat-left-out")
