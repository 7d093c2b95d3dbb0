"""The web UI in a real headless Chromium, against a real `llmd up` (2 CPU workers, real mDNS on loopback).

One `llmd up` serves the whole module; the tests run in file order on one page and save a screenshot
of each tab under test-artifacts/ui/.
"""

import json
import os
import re
import shutil

import httpx
import pytest

from agents import new_secret, start_agent
from netns import stop
from ui_helpers import (browser_page, call_event, open_tab, plot_has_points, remember_children, screenshot, start_up,
                        stop_up, table_rows, wait_for, wait_text)

pytestmark = pytest.mark.slow  # a real `llmd up` and a browser

MAX_NEW_TOKENS = 24
BOT = "#chatbot .message.bot, #chatbot [data-testid='bot']"


@pytest.fixture(scope="module")
def secret():
    return new_secret()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_models["qwen2-bias"], folder / "tiny-qwen")
    return folder


@pytest.fixture(scope="module")
def up(tmp_path_factory, secret, models_dir):
    server = start_up(tmp_path_factory.mktemp("up"), secret, "--workers", "2", "--compile", "off",
                      "--max-new-tokens", str(MAX_NEW_TOKENS), "--models-dir", str(models_dir))
    try:
        yield server
    finally:
        stop(server.proc, timeout=45)


@pytest.fixture(scope="module")
def page(up):
    with browser_page(up.url) as page:
        yield page


def test_the_page_shows_progress_then_ready(page, up):
    first = wait_text(page, "#status", r"loading|ready", timeout_s=30)
    assert "loading" in first or "ready" in first
    wait_text(page, "#status", r"\bready\b", timeout_s=180)
    assert up.proc.poll() is None
    remember_children(up)  # the agent child and the worker, checked to be gone at the end
    assert len(up.children) >= 2


def bot_text(page) -> str:
    bots = page.query_selector_all(BOT)
    return bots[-1].inner_text().strip() if bots else ""


def send(page, message: str) -> list[str]:
    """Send a message; return the distinct texts the reply showed while it streamed."""
    before = len(page.query_selector_all(BOT))
    page.fill("#chat-input textarea", message)
    page.click("#send")
    partials: list[str] = []
    wait_for(lambda: len(page.query_selector_all(BOT)) > before, "the reply bubble")
    while not re.search(r"tokens/s|error", page.inner_text("#reply-stats")):
        text = bot_text(page)
        if text and (not partials or partials[-1] != text):
            partials.append(text)
        page.wait_for_timeout(30)
    return partials


def test_a_client_without_the_admin_link_cannot_reveal_join_drop_relaunch_or_save_prices(up, secret):
    refused = {"reveal": [None], "join": ["anyone", None], "drop": ["anyone", None], "relaunch": [],
               "save_prices": [123.0, "XYZ", "", 65]}
    for name, data in refused.items():
        out = call_event(up.url, name, data, session=f"probe-{name}")
        text = json.dumps(out)
        assert "Admin only" in text and secret not in text, (name, text)
    assert call_event(up.url, "price_form", [])[:2] != [123.0, "XYZ"]  # nothing was saved
    with httpx.Client(base_url=up.url) as admin:  # the same call from an admin session is obeyed
        assert admin.get(up.admin_link.removeprefix(up.url)).status_code == 303
        assert secret in json.dumps(call_event(up.url, "reveal", [None], cookies=admin.cookies, session="admin"))
    assert httpx.get(up.url + "/admin?token=guess").status_code == 403


def test_the_page_refuses_other_hosts_other_origins_and_uploads(up):
    port = up.url.rsplit(":", 1)[1]
    assert httpx.get(up.url, headers={"Host": f"rebound.example:{port}"}).status_code == 400
    assert httpx.get(up.url, headers={"Host": f"localhost:{port}"}).status_code == 200
    posted = httpx.post(up.url + "/gradio_api/queue/join", json={}, headers={"Origin": "http://evil.example"})
    assert posted.status_code == 403
    assert httpx.post(up.url + "/gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 404
    assert httpx.get(up.url + "/gradio_api/info").json() == {"named_endpoints": {}, "unnamed_endpoints": {}}


def test_chat_streams_a_greedy_reply(page):
    open_tab(page, "Chat")
    page.get_by_text("Generation settings").click()
    page.check("#greedy input")
    partials = send(page, "Name three colours.")
    stats = page.inner_text("#reply-stats")
    assert re.search(r"\d+ tokens · [\d.]+ tokens/s · first token \d+ ms", stats), stats
    # The stats line sits under the reply too, once the chat box has drawn it (it may lag the stats box).
    final = wait_for(lambda: "tokens/s" in (t := bot_text(page)) and t, "the reply's stats in the chat box")
    growing = [t for t in partials if "tokens/s" not in t]
    assert len(set(growing)) >= 2, f"the reply did not stream: {partials}"
    assert final.startswith(growing[-1].strip()[:10])
    screenshot(page, "chat")


def test_stop_cancels_a_reply(page):
    page.fill("#max-new-tokens input", "400")
    page.fill("#chat-input textarea", "Write a long story about a dragon who learns to cook.")
    page.click("#send")
    wait_text(page, "#reply-stats", r"generating")
    page.click("#stop")
    stats = wait_text(page, "#reply-stats", r"tokens/s", timeout_s=60)
    assert "stopped" in stats
    assert int(stats.split()[0]) < 400
    page.fill("#max-new-tokens input", str(MAX_NEW_TOKENS))


def test_cluster_tab_changes_need_the_admin_link(page, up, secret):
    open_tab(page, "Cluster")
    page.click("#reveal")
    wait_text(page, "#cluster-note", "Admin only")
    assert secret not in page.inner_text("#join-command")
    page.click("#relaunch")
    wait_text(page, "#cluster-note", "Admin only")
    page.goto(up.admin_link)  # as the person at the console would: an admin session in this browser
    wait_text(page, "#status", r"\bready\b", timeout_s=60)


def test_cluster_tab_joins_and_drops_an_agent(page, secret):
    open_tab(page, "Cluster")
    # This machine's agent answers "ok"; another pool's `llmd up` on this machine (a test run beside this one)
    # is listed as this machine too, but refused: only an agent with this pool's secret can be ok.
    wait_for(lambda: [r for r in table_rows(page, "#peers") if r.split("\t")[-1:] == ["yes"] and "\tok\t" in r],
             "this machine's agent answering in the peer table", timeout_s=30)
    name = f"ui-agent-{os.getpid()}"
    agent = start_agent(name, secret)
    try:
        def row():
            return next((r for r in table_rows(page, "#peers") if r.startswith(name)), "")

        assert "not joined" in wait_for(lambda: "\tok\t" in row() and row(), f"{name} answering", timeout_s=30)
        pick = page.locator("#peer-pick input")
        pick.fill(name)
        pick.press("Enter")
        page.click("#join")
        wait_text(page, "#cluster-note", rf"{name} joined")
        wait_for(lambda: "joined" in row() and "not joined" not in row(), f"{name} shown as joined")
        screenshot(page, "cluster")
        page.click("#drop")
        wait_text(page, "#cluster-note", rf"{name} dropped")
        wait_for(lambda: "not joined" in row(), f"{name} shown as not joined")
    finally:
        stop(agent.proc)
    assert "••••" in page.inner_text("#join-command")
    page.click("#reveal")
    wait_text(page, "#join-command", secret)


def test_gpus_tab_shows_devices_and_live_plots(page):
    open_tab(page, "GPUs")
    rows = wait_for(lambda: [r for r in table_rows(page, "#devices") if "cpu:" in r], "device rows")
    assert any("cpu:1" in r for r in rows) and any("(est.)" in r for r in rows)
    for plot in ("#util-plot", "#mem-plot", "#power-plot"):
        wait_for(lambda plot=plot: plot_has_points(page, plot), f"samples drawn in {plot}")
    screenshot(page, "gpus")


def test_plan_tab_draws_layers_and_heads_per_rank(page):
    open_tab(page, "Plan")
    grid = wait_for(lambda: page.query_selector("#plan-heatmap-grid"), "the plan heatmap")
    assert grid.get_attribute("data-ranks") == "2"
    owners = {c.get_attribute("data-rank") for c in page.query_selector_all("#plan-heatmap .plan-cell")}
    assert owners == {"0", "1"}
    assert len(page.query_selector_all("#plan-heatmap .plan-cell")) == 30 * 9  # SmolLM2: 30 layers, 9 heads
    wait_for(lambda: page.query_selector_all("#plan-bars g.mark-rect path"), "the share bars")
    prediction = wait_for(lambda: table_rows(page, "#prediction"), "predicted and measured figures")
    assert any(r.startswith("decode tokens/s") and re.search(r"\d", r.split("\t", 1)[1]) for r in prediction)
    screenshot(page, "plan")


def test_balancer_tab_shows_its_timeline(page):
    open_tab(page, "Balancer")
    wait_text(page, "#balancer-note", r"migration|step times")
    assert page.query_selector("#migrations")
    wait_for(lambda: plot_has_points(page, "#rank-steps"), "per-rank step times drawn")
    screenshot(page, "balancer")


def cost_per_million(page) -> float:
    text = wait_text(page, "#cost-summary", r"Cost per 1M tokens: [\d.]+")
    return float(re.search(r"Cost per 1M tokens: ([\d.]+)", text).group(1))


def test_costs_change_with_the_electricity_price(page):
    open_tab(page, "Costs")
    wait_for(lambda: any("done" in r for r in table_rows(page, "#requests")), "a finished request row")
    assert any("cancelled" in r for r in table_rows(page, "#requests"))
    assert "estimate" in page.inner_text("#cost-summary")
    before = cost_per_million(page)
    assert before > 0
    price = float(page.input_value("#price input"))
    page.fill("#price input", str(price * 10))
    page.click("#save-prices")
    wait_text(page, "#prices-note", "Saved")
    after = wait_for(lambda: (c := cost_per_million(page)) != before and c, "the cost to follow the price")
    assert after == pytest.approx(before * 10, rel=0.01)
    screenshot(page, "costs")


def test_the_model_picker_lists_the_folder_and_runs_a_model(page):
    """The Chat tab's models: each with its size and the precisions the planner says fit; running one (the
    page holds an admin session by now) relaunches the pool on it."""
    open_tab(page, "Chat")
    page.click("#model-picker")
    row = wait_for(lambda: next((r for r in table_rows(page, "#models") if r.startswith("tiny-qwen")), ""),
                   "the folder's model listed")
    assert "13 MB" in row and "fp32" in row and "int4" not in row  # its sizes are not whole int4 groups
    pick = page.locator("#model-pick input")
    pick.click()
    page.get_by_role("option", name=re.compile("tiny-qwen")).click()
    page.click("#switch-model")
    wait_text(page, "#models-note", "Launching")
    wait_text(page, "#status", r"tiny-qwen.*\bready\b|\bready\b.*tiny-qwen", timeout_s=120)
    screenshot(page, "model-picker")


def test_stopping_up_leaves_no_process(up):
    left = stop_up(up)
    assert up.proc.returncode == 0
    assert not left, f"still running after llmd up stopped: {left}"


def test_ctrl_c_while_the_model_loads_stops_everything(tmp_path, secret):
    import signal

    server = start_up(tmp_path, secret, "--workers", "2", "--compile", "off")
    try:
        remember_children(server)  # the URL is printed before the model is ready
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0
    finally:
        left = stop_up(server)
    assert not left, f"still running after Ctrl-C: {left}"
