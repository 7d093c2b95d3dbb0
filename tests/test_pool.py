"""The pool service with a real store and a real engine, and the UI's view functions, without a browser."""

import shutil
import time

import pytest

from agents import new_secret, start_agent
from llmd.app.cli import build_parser
from llmd.app.pool import (ChatSettings, Failed, Finished, Pool, PoolConfig, PoolNotReady, Progress, Reply, Request,
                           Token)
from llmd.engine.errors import LlmdError
from llmd.engine.sampling import SamplingParams
from llmd.app.store import Settings, Store
from llmd.ui.commands import add_up_commands, recipe_for
from llmd.engine.plan import make_pipeline_plan
from llmd.engine.presets import preset
from llmd.ui import fns
from netns import stop
from reference import hf_greedy

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


# ---- the view functions

def reply(**kw) -> Reply:
    base = {"request_id": "r", "text": "Paris.", "tokens": 3, "prompt_tokens": 9, "ttft_s": 0.125, "tokens_per_s": 20.0,
            "finish_reason": "stop", "energy_j": 1.0, "energy_estimated": True, "cost": 0.0, "currency": "EUR"}
    return Reply(**{**base, **kw})


def test_chat_history_becomes_plain_messages_without_the_stats_line():
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": fns.with_stats("Hello!", reply())},
               {"role": "user", "content": "More"}]
    assert fns.chat_messages(history) == [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello!"},
                                          {"role": "user", "content": "More"}]
    assert fns.reply_stats(reply()) == "3 tokens · 20.0 tokens/s · first token 125 ms"
    assert fns.reply_stats(reply(finish_reason="cancelled")).endswith("· stopped")


def test_status_says_loading_ready_or_failed():
    now = time.time()
    assert "loading" in fns.status_markdown(Progress("loading shards", 0.3, since=now - 5), now)
    assert "30%" in fns.status_markdown(Progress("loading shards", 0.3, since=now - 5), now)
    assert "ready" in fns.status_markdown(Progress("ready", 1.0), now, waiting=2)
    failed = fns.status_markdown(Progress("failed", error="worker rank 1 exited"), now)
    assert "failed" in failed and "worker rank 1 exited" in failed


@pytest.mark.parametrize("shares,stages", [([1, 1], 1), ([2, 1, 1], 2), ([1, 1, 1, 1], 1)])
def test_plan_drawing_gives_every_layer_and_head_one_rank(shares, stages):
    cfg = preset("smollm2-135m")
    plan = {**make_pipeline_plan(cfg, shares, stages).to_dict(), "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads}
    grid, heads = fns.owners(plan)
    assert heads == cfg.num_heads and len(grid) == cfg.num_layers
    assert all(0 <= r < len(shares) for row in grid for r in row)
    assert {r for row in grid for r in row} == set(range(len(shares)))
    html = fns.plan_heatmap_html(plan)
    assert html.count('class="plan-cell"') == cfg.num_layers * cfg.num_heads
    shares_df = fns.shares_frame(plan)
    assert shares_df.groupby("part")["share %"].sum().round(1).eq(100.0).all()


def test_devices_table_has_one_row_per_device_with_its_latest_sample():
    def sample(t, device, util):
        return {"time": t, "node": "ws1", "device": device, "utilisation": util, "memory_used_mb": 100.0,
                "memory_total_mb": 1000.0, "power_w": 10.0, "temperature_c": None, "power_estimated": True}

    rows = [sample(1, "cpu:0", 10), sample(1, "cpu:1", 20), sample(2, "cpu:0", 30)]
    df = fns.devices_frame(rows, {})
    assert list(df["device"]) == ["cpu:0", "cpu:1"] and list(df["utilisation %"]) == [30, 20]
    assert df["power W"][0] == "10.0 (est.)" and "host process" in df["name"][0]
    frame = fns.samples_frame(rows)
    assert fns.metric_frame(frame, "temperature_c").empty and len(fns.metric_frame(frame, "utilisation")) == 3


def finished_request(energy_j: float, seconds: float, tokens: int) -> dict:
    return {"id": "x", "created": 1000.0, "started": 1000.0, "finished": 1000.0 + seconds, "status": "done",
            "prompt_tokens": 10, "generated_tokens": tokens, "decode_tokens_per_s": 20.0, "ttft_s": 0.1,
            "energy_j": energy_j, "energy_estimated": True, "cost": 123.0}


def per_million(text: str) -> float:
    return float(text.split("Cost per 1M tokens: ")[1].split()[0])


def test_costs_follow_the_prices_from_stored_energy_and_time():
    requests = [finished_request(3.6e6, 3600.0, 1_000_000)]  # 1 kWh and 1 hour for 1M tokens
    cheap, dear = Settings(electricity_per_kwh=0.3), Settings(electricity_per_kwh=3.0)
    assert per_million(fns.cost_markdown(requests, cheap)) == pytest.approx(0.3)
    assert per_million(fns.cost_markdown(requests, dear)) == pytest.approx(3.0)
    rented = Settings(electricity_per_kwh=0.3, node_hourly={"ws1": 2.0})
    assert per_million(fns.cost_markdown(requests, rented)) == pytest.approx(2.3)
    assert "estimate" in fns.cost_markdown(requests, cheap)
    assert fns.cost_frame(requests, dear)["cost_per_million"].iloc[0] == pytest.approx(3.0)
    assert fns.requests_frame(requests, dear)["cost EUR"][0] == "3.000000"


def test_cost_per_key_counts_each_keys_requests_and_a_batched_request_pays_its_share_of_node_hours():
    rented = Settings(electricity_per_kwh=0.0, node_hourly={"ws1": 3600.0})  # 1 a second
    alone = {**finished_request(0.0, 10.0, 100), "api_key": "alice", "busy_s": 10.0}
    batched = {**finished_request(0.0, 10.0, 100), "api_key": "alice", "busy_s": 2.5}  # a quarter of 4 rows
    web = {**finished_request(0.0, 10.0, 50), "api_key": None, "user": "web", "busy_s": None}
    table = fns.cost_by_key([alone, batched, web], rented)
    rows = {r["key"]: r for r in table.to_dict("records")}
    assert rows["alice"]["requests"] == 2 and rows["alice"]["tokens"] == 200
    assert float(rows["alice"]["cost EUR"]) == pytest.approx(10.0 + 2.5)
    assert float(rows["web page"]["cost EUR"]) == pytest.approx(10.0)  # no share recorded: all of the time


def test_price_form_is_checked():
    assert fns.parse_node_prices("ws1=0.5, ws2 = 1.25") == {"ws1": 0.5, "ws2": 1.25}
    with pytest.raises(ValueError, match="ws1"):
        fns.parse_node_prices("ws1")
    with pytest.raises(ValueError, match="electricity"):
        fns.settings_from_form(-1, "EUR", "", 65, Settings())
    s = fns.settings_from_form(0.25, "CHF", "a=1", 90, Settings())
    assert (s.electricity_per_kwh, s.currency, s.node_hourly, s.cpu_tdp_w) == (0.25, "CHF", {"a": 1.0}, 90.0)


def test_migration_timeline_rows():
    event = {"time": 1e9, "step": 40, "epoch": 1, "kv_groups": [2], "from_rank": 1, "to_rank": 0,
             "reason": "rank 1 is 30% slower", "step_ms_before": [10.0, 13.0], "step_ms_after": [11.5, 11.4],
             "duration_s": 0.2}
    df = fns.migrations_frame([event])
    assert df["from → to"][0] == "rank 1 → rank 0" and "kv groups [2]" in df["moved"][0]
    assert df["step ms before"][0] == "10.0 / 13.0"
    assert "No migration" in fns.balancer_note([], [])
    assert fns.rank_steps_frame([{"time": 1e9, "rank": 0, "step_ms": 3.0}])["rank"][0] == "rank 0"


# ---- the pool with a real store and engine

def engine_args(*extra: str):
    return build_parser([add_up_commands]).parse_args(["up", "--device", "cpu", "--compile", "off", "--weights", "fp32",
                                                       "--context", "256", "--slots", "4", *extra])


def make_pool(tmp_path, workers: int, secret: str = "s", extra: tuple[str, ...] = ()) -> Pool:
    store = Store(tmp_path / "llmd.db")
    config = PoolConfig(node="testnode", address="127.0.0.1", secret=secret,
                        recipe=recipe_for(engine_args("--workers", str(max(workers, 1)), *extra), local=workers > 0),
                        sample_period_s=0.25)
    return Pool(store, config)


def wait_ready(pool: Pool, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not pool.progress.ready:
        assert pool.progress.phase != "failed", pool.progress.error
        assert time.monotonic() < deadline, f"still {pool.progress}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = make_pool(tmp_path_factory.mktemp("pool"), workers=1)
    try:
        p.start(local_agent=False)
        phases = set()
        p.launch_local()
        while not p.progress.ready and p.progress.phase != "failed":
            phases.add(p.progress.phase)
            time.sleep(0.02)
        wait_ready(p)
        p.phases_seen = phases
        yield p
    finally:
        p.close()
        p.store.close()


def chat(pool: Pool, max_new_tokens: int, should_stop=lambda: False, on_delta=None,
         messages=HELLO) -> tuple[str, Reply]:
    text, final = "", None
    for event in pool.chat(messages, ChatSettings(max_new_tokens=max_new_tokens, greedy=True), should_stop):
        assert not isinstance(event, Failed), event.error
        if isinstance(event, Token):
            text += event.text
            if on_delta:
                on_delta(text)
        elif isinstance(event, Finished):
            final = event.reply
    return text, final


def wait_status(pool: Pool, request_id: str, status: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (row := {r["id"]: r for r in pool.store.requests()}[request_id])["status"] != status:
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


def test_chat_before_the_model_is_ready_is_a_clear_error(tmp_path):
    p = make_pool(tmp_path, workers=1)
    with pytest.raises(PoolNotReady, match="not ready"):
        next(p.chat(HELLO, ChatSettings()))
    p.store.close()


def test_launch_reports_its_phases(pool):
    assert "loading shards" in pool.phases_seen or "warming up" in pool.phases_seen
    assert pool.progress.fraction == 1.0


def test_a_chat_streams_the_transformers_reply_and_is_journalled(pool, default_model_dir):
    seen_running = []

    def check_journal(_text):
        if not seen_running:
            seen_running.append(pool.store.requests()[-1]["status"])

    text, r = chat(pool, 12, on_delta=check_journal)
    assert seen_running == ["running"]  # in the store before and while it runs
    engine = pool.engine
    expected = hf_greedy(default_model_dir, engine.text.chat_ids(HELLO), 12)
    assert text == r.text == engine.text.decode(expected)
    row = pool.store.requests()[-1]
    assert row["id"] == r.request_id and row["status"] == "done"
    assert row["generated_tokens"] == r.tokens == len(expected)
    assert row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["finished"] >= row["started"]
    assert row["energy_j"] > 0 and row["energy_estimated"] and row["cost"] > 0


def test_stop_cancels_and_the_row_says_so(pool):
    deltas = []
    _, r = chat(pool, 200, should_stop=lambda: len(deltas) >= 3, on_delta=deltas.append)
    assert r.finish_reason == "cancelled" and r.tokens < 200
    assert pool.store.requests()[-1]["status"] == "cancelled"


def test_a_chat_abandoned_mid_stream_is_cancelled(pool):
    stream = pool.chat(HELLO, ChatSettings(max_new_tokens=200, greedy=True))
    assert isinstance(next(stream), Token)
    stream.close()
    wait_status(pool, pool.store.requests()[-1]["id"], "cancelled")  # released between two steps
    _, r = chat(pool, 4)  # the engine serves the next request as usual
    assert r.tokens == 4


def events_of(ticket) -> tuple[list[int], Reply]:
    tokens, reply = [], None
    for event in ticket.events():
        assert not isinstance(event, Failed), event.error
        if isinstance(event, Token) and event.token_id >= 0:
            tokens.append(event.token_id)
        elif isinstance(event, Finished):
            reply = event.reply
    return tokens, reply


def test_chats_share_steps_and_each_gets_the_tokens_it_gets_alone(pool, default_model_dir):
    """Staggered arrivals, prompts of different lengths, one cancelled mid-stream: every greedy reply is
    transformers' greedy reply to its own prompt, whatever else ran in the same steps."""
    text = pool.engine.text
    prompts = [text.chat_ids([{"role": "user", "content": q}]) for q in
               ("What is the capital of France?", "Name three colours of the rainbow, please.", "Hi")]
    def greedy(budget: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=budget, greedy=True, stop_token_ids=text.stop_token_ids)

    first = pool.submit(Request(prompts[0], greedy(10)))
    second = pool.submit(Request(prompts[1], greedy(7)))
    doomed = pool.submit(Request(prompts[2], greedy(200)))
    events, seen = doomed.events(), 0
    for event in events:  # two tokens in, its reader walks away
        seen += isinstance(event, Token)
        if seen == 2:
            break
    events.close()
    third = pool.submit(Request(prompts[2], greedy(5)))  # arrives later
    results = [events_of(t) for t in (first, second, third)]
    for (tokens, reply), prompt, budget in zip(results, [prompts[0], prompts[1], prompts[2]], (10, 7, 5)):
        expected = hf_greedy(default_model_dir, prompt, budget)
        assert tokens == expected and reply.tokens == len(tokens)
        assert reply.text == text.decode(tokens)
    wait_status(pool, doomed.id, "cancelled")
    rows = {r["id"]: r for r in pool.store.requests()}
    a, b = rows[first.id], rows[second.id]
    assert b["started"] < a["finished"] and a["started"] < b["finished"]  # they ran in the same steps


def test_samples_and_plan_are_recorded(pool):
    samples = pool.store.samples(device="cpu:0")
    assert samples and all(s["power_estimated"] and s["power_w"] > 0 for s in samples)
    assert samples[-1]["memory_used_mb"] > 100  # the host process holds rank 0's weights
    entry = pool.store.latest_plan()
    assert entry["plan"]["world_size"] == 1 and entry["plan"]["devices"][0]["device"] == "cpu"
    assert entry["predicted"]["tokens_per_s"] > 0 and entry["plan"]["measured"][0]["weights_mb"] > 0
    table = fns.prediction_frame(entry, pool.store.requests())
    assert table["measured"][0] != "—"


def test_host_mode_launches_on_a_joined_agent(tmp_path):
    secret = new_secret()
    agent = start_agent(f"pool-agent-{time.monotonic_ns()}", secret)
    p = make_pool(tmp_path, workers=0, secret=secret)
    try:
        p.start(local_agent=False)
        assert p.progress.phase == "waiting"
        deadline = time.monotonic() + 20
        while not [x for x in p.peers() if x["name"] == agent.name and x["health"] == "ok"]:
            assert time.monotonic() < deadline, p.peers()
            time.sleep(0.2)
        assert p.join(agent.name)["joined"]
        p.relaunch()
        wait_ready(p)
        assert p.engine.spec.plan["world_size"] == 2  # rank 0 here, rank 1 on the agent
        _, r = chat(p, 4)
        assert r.tokens == 4
        assert [d["node"] for d in p.store.latest_plan()["plan"]["devices"]] == ["testnode", agent.name]
    finally:
        p.close()
        p.store.close()
        stop(agent.proc)


@pytest.mark.slow
def test_the_balancers_migrations_and_new_plan_are_recorded(tmp_path):
    p = make_pool(tmp_path, workers=2)
    p.config.recipe = recipe_for(engine_args("--workers", "2", "--balance", "on", "--slowdown", "1:3@8"), local=True)
    try:
        p.start(local_agent=False)
        p.launch_local()
        wait_ready(p)
        prompt = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
        settings = ChatSettings(max_new_tokens=160, greedy=True)
        # A move needs 32 steps of evidence, then its paced load, which a loaded machine stretches: chat
        # until one is recorded (a move under way carries over to the next chat), within a deadline.
        deadline = time.monotonic() + 300
        while not p.store.migrations():
            assert time.monotonic() < deadline, "no migration recorded within 300 s"
            r = next(x.reply for x in p.chat(prompt, settings) if isinstance(x, Finished))
            assert r.tokens > 16
        events = p.store.migrations()
        assert events and events[0]["from_rank"] == 1 and events[0]["to_rank"] == 0
        assert {s["rank"] for s in p.store.rank_steps()} == {0, 1}
        assert p.store.latest_plan()["plan"]["epoch"] >= 1  # the plan tab draws the moved plan
        assert "rank 1 → rank 0" in fns.migrations_frame(events)["from → to"][0]
    finally:
        p.close()
        p.store.close()


def test_the_models_folder_lists_what_fits_and_switching_relaunches_on_it(tmp_path, tiny_models):
    """`--models-dir`: its models with their sizes and the precisions that fit this machine's devices;
    running one relaunches the pool on it, and a path outside the folder is refused."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(tiny_models["qwen2-bias"], folder / "tiny-qwen")
    (folder / "notes.txt").write_text("not a model")
    (folder / "other.gguf").write_bytes(b"GGUF")  # listed, its precisions known only once converted
    p = make_pool(tmp_path, workers=1, extra=("--models-dir", str(folder)))
    try:
        p.start(local_agent=False)
        p.launch_local()
        wait_ready(p)
        listed = {m.name: (m, fits) for m, fits in p.models()}
        assert sorted(listed) == ["other", "tiny-qwen"]
        tiny, fits = listed["tiny-qwen"]
        assert tiny.bytes > 0 and set(fits) == {"fp32", "bf16", "fp16", "int8"}  # int4: its sizes are not in groups
        assert listed["other"][1] == []
        with pytest.raises(LlmdError, match="not in the models folder"):
            p.switch_model(str(tiny_models["llama-gqa"]))  # a path, or any name not listed there
        p.switch_model(tiny.name)
        wait_ready(p)
        assert p.model_name() == "tiny-qwen"
        _, r = chat(p, 4)
        assert r.tokens == 4
        with pytest.raises(LlmdError, match="not a folder"):
            p.set_models_dir(str(tmp_path / "absent"))
    finally:
        p.close()
        p.store.close()
