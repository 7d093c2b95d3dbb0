"""The SQLite store on real files: schema, schema migrations, refusing bad files, locks, downsampling,
restart persistence and concurrent writers (threads and a second process)."""

import math
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmd.app.costs import energy_j
from llmd.app.store import (SCHEMA_VERSION, RequestNotFound, Sample, Settings, Store, StoreCorrupt, StoreError,
                            StoreLocked, StoreTooNew, default_db_path)

# The schema as version 1 shipped it, written by hand so the migration is tested against real old files.
V1_SCHEMA = """
CREATE TABLE nodes (id TEXT PRIMARY KEY, name TEXT, address TEXT, port INTEGER, joined INTEGER, devices TEXT,
                    first_seen FLOAT, last_seen FLOAT);
CREATE TABLE gpus (node TEXT, device TEXT, name TEXT, memory_total_mb FLOAT, updated FLOAT,
                   PRIMARY KEY (node, device));
CREATE TABLE gpu_samples (id INTEGER PRIMARY KEY, time FLOAT, node TEXT, device TEXT, utilisation FLOAT,
                          memory_used_mb FLOAT, memory_total_mb FLOAT, power_w FLOAT, temperature_c FLOAT);
CREATE INDEX idx_gpu_samples_time ON gpu_samples (time);
CREATE TABLE requests (id TEXT PRIMARY KEY, created FLOAT, user TEXT, model TEXT, prompt TEXT,
                       prompt_tokens INTEGER, generated_tokens INTEGER, status TEXT, ttft_s FLOAT,
                       decode_tokens_per_s FLOAT, energy_j FLOAT, cost FLOAT, error TEXT, finished FLOAT);
CREATE TABLE plans (id INTEGER PRIMARY KEY, time FLOAT, plan TEXT, predicted TEXT);
CREATE TABLE migrations (id INTEGER PRIMARY KEY, time FLOAT, step INTEGER, epoch INTEGER, layers TEXT,
                         kv_groups TEXT, mlp_columns TEXT, from_rank INTEGER, to_rank INTEGER, reason TEXT,
                         step_ms_before FLOAT, step_ms_after FLOAT, duration_s FLOAT, bytes_moved INTEGER);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);
PRAGMA user_version = 1;
"""


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def sample(t: float, device: str = "cuda:0", util: float = 50.0, power: float | None = 100.0,
           node: str = "ws1") -> Sample:
    return Sample(time=t, node=node, device=device, utilisation=util, memory_used_mb=1000.0,
                  memory_total_mb=24000.0, power_w=power, temperature_c=60.0)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "llmd.db")
    yield s
    s.close()


def test_default_path_follows_llmd_db_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMD_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("LLMD_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_db_path() == tmp_path / "data" / "llmd" / "llmd.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_db_path() == Path.home() / ".local" / "share" / "llmd" / "llmd.db"


def test_a_new_file_gets_the_schema_in_wal_mode(tmp_path):
    path = tmp_path / "deep" / "folder" / "llmd.db"  # parent folders are created
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION == 3
    con = raw(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"nodes", "gpus", "gpu_samples", "requests", "plans", "migrations", "settings", "rank_steps"} <= tables
    columns = {r[1] for r in con.execute("PRAGMA table_info(requests)")}
    assert {"id", "user", "model", "prompt_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s",
            "energy_j", "energy_estimated", "cost", "status"} <= columns
    sample_columns = {r[1] for r in con.execute("PRAGMA table_info(gpu_samples)")}
    assert {"time", "utilisation", "memory_used_mb", "power_w", "temperature_c", "resolution_s"} <= sample_columns


def test_a_version_1_file_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    con = raw(path)
    con.executescript(V1_SCHEMA)
    con.execute("INSERT INTO requests VALUES ('r1', 100.0, 'alice', 'smollm2', 'hi', 3, 7, 'done', 0.1, 20.0, "
                "5.0, 0.01, NULL, 101.0)")
    con.execute("INSERT INTO gpu_samples (time, node, device, utilisation, memory_used_mb, memory_total_mb, "
                "power_w, temperature_c) VALUES (50.0, 'ws1', 'cuda:0', 40, 1000, 24000, 150, 55)")
    con.execute("INSERT INTO migrations (time, step, layers, from_rank, to_rank) VALUES (60.0, 12, '[1, 2]', 0, 1)")
    con.execute("""INSERT INTO settings VALUES ('electricity_per_kwh', '0.25'), ('currency', '"CHF"')""")
    con.close()

    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        [r] = s.requests()
        assert (r["id"], r["user"], r["generated_tokens"], r["cost"]) == ("r1", "alice", 7, 0.01)
        assert r["energy_estimated"] is False  # the new column's default for old rows
        [smp] = s.samples()
        assert smp["power_w"] == 150 and smp["resolution_s"] == 1.0 and smp["power_estimated"] is False
        [m] = s.migrations()
        assert m["layers"] == [1, 2] and m["step"] == 12
        assert s.settings() == Settings(electricity_per_kwh=0.25, currency="CHF")
        s.add_rank_steps(70.0, [10.0, 12.5])  # a table version 2 added
        assert [r["step_ms"] for r in s.rank_steps()] == [10.0, 12.5]
    con = raw(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "future.db"
    con = raw(path)
    con.executescript(V1_SCHEMA.replace("user_version = 1", "user_version = 99"))
    con.execute("INSERT INTO settings VALUES ('currency', '\"EUR\"')")
    con.close()
    before = path.read_bytes()
    with pytest.raises(StoreTooNew, match="schema version 99") as err:
        Store(path)
    assert str(path) in str(err.value) and "upgrade llmd" in str(err.value)
    assert path.read_bytes() == before
    assert raw(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not even switched to WAL


def test_a_garbage_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "notes.db"
    garbage = random.Random(1).randbytes(8192)
    path.write_bytes(garbage)
    with pytest.raises(StoreCorrupt) as err:
        Store(path)
    message = str(err.value)
    assert str(path) in message and "is not an SQLite database" in message and "--db" in message
    assert "\n" not in message
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no -wal or -shm left beside it


def test_a_damaged_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "llmd.db"
    with Store(path) as s:
        for i in range(300):  # enough rows for several pages
            s.add_request("alice", "m", i, prompt="x" * 200)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page:3 * page] = random.Random(2).randbytes(page)  # scribble over a whole b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt) as err:
        Store(path)
    assert str(path) in str(err.value) and "--db" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == bytes(data)


def test_a_write_locked_past_the_busy_timeout_fails_clearly_and_loses_nothing(tmp_path):
    path = tmp_path / "llmd.db"
    s = Store(path, busy_timeout_s=0.2)
    first = s.add_request("alice", "m", 5)
    other = raw(path)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    other.execute("INSERT INTO settings VALUES ('currency', '\"USD\"')")
    t0 = time.monotonic()
    with pytest.raises(StoreLocked) as err:
        s.add_request("bob", "m", 6)
    assert time.monotonic() - t0 >= 0.2  # it waited for the busy timeout before giving up
    assert str(path) in str(err.value) and "locked" in str(err.value) and "--db" in str(err.value)
    assert [r["id"] for r in s.requests()] == [first]  # readers still work under WAL
    other.execute("COMMIT")
    other.close()
    second = s.add_request("bob", "m", 6)  # the lock is gone: writing works again
    s.close()
    with Store(path) as s:
        assert [r["id"] for r in s.requests()] == [first, second]
        assert s.settings().currency == "USD"


def test_a_file_locked_at_open_fails_clearly_and_keeps_the_other_writer_rows(tmp_path):
    path = tmp_path / "shared.db"
    other = raw(path)  # another program's file, rollback journal, mid-transaction with an exclusive lock
    other.execute("CREATE TABLE notes (text TEXT)")
    other.execute("BEGIN EXCLUSIVE")
    other.execute("INSERT INTO notes VALUES ('keep me')")
    with pytest.raises(StoreLocked) as err:
        Store(path, busy_timeout_s=0.2)
    assert str(path) in str(err.value)
    other.execute("COMMIT")
    other.close()
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
    assert raw(path).execute("SELECT text FROM notes").fetchall() == [("keep me",)]


def test_everything_survives_a_restart(tmp_path):
    path = tmp_path / "llmd.db"
    s = Store(path)
    s.upsert_node("n1", "ws1", "198.18.0.2", 7860, True, [{"device": "cuda:0", "name": "RTX 4090"}])
    s.upsert_gpu("n1", "cuda:0", "RTX 4090", 24564.0)
    s.add_samples([sample(1000.0 + i) for i in range(5)])
    rid = s.add_request("alice", "smollm2", 12, prompt="Hello")
    s.update_request(rid, status="done", generated_tokens=40, ttft_s=0.12, decode_tokens_per_s=35.0,
                     energy_j=90.0, energy_estimated=True, cost=0.002, finished=1010.0)
    queued = s.add_request("bob", "smollm2", 3, prompt="Still waiting")
    plan_id = s.add_plan({"stages": [[0, 30]], "epoch": 1}, {"tokens_per_s": 41.0})
    s.add_migrations([{"time": 1005.0, "step": 100, "kv_groups": [3], "from_rank": 1, "to_rank": 0}])
    s.add_rank_steps(1005.0, [20.0, 25.0])
    settings = Settings(electricity_per_kwh=0.42, currency="CHF", node_hourly={"n1": 0.8}, cpu_tdp_w=95.0)
    s.save_settings(settings)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.requests()

    with Store(path) as s:
        [node] = s.nodes()
        assert node["joined"] is True and node["devices"][0]["name"] == "RTX 4090" and node["port"] == 7860
        assert s.gpus()[0]["memory_total_mb"] == 24564.0
        assert [x["time"] for x in s.samples()] == [1000.0 + i for i in range(5)]
        done, waiting = s.requests()
        assert done["status"] == "done" and done["energy_estimated"] is True and done["ttft_s"] == 0.12
        assert done["prompt"] == "Hello" and done["cost"] == 0.002
        assert [r["id"] for r in s.unfinished_requests()] == [queued] == [waiting["id"]]
        assert s.latest_plan() == {"id": plan_id, "time": pytest.approx(time.time(), abs=60),
                                   "plan": {"stages": [[0, 30]], "epoch": 1}, "predicted": {"tokens_per_s": 41.0}}
        assert s.migrations()[0]["kv_groups"] == [3]
        assert s.rank_steps() == [{"time": 1005.0, "rank": 0, "step_ms": 20.0},
                                  {"time": 1005.0, "rank": 1, "step_ms": 25.0}]
        assert s.settings() == settings


def test_settings_default_until_saved(store):
    assert store.settings() == Settings()
    store.save_settings(Settings(electricity_per_kwh=0.1))
    assert store.settings().electricity_per_kwh == 0.1 and store.settings().currency == "EUR"


def test_requests_lifecycle_order_and_checks(store):
    ids = [store.add_request(f"user{i}", "m", i, created=100.0 + i) for i in range(5)]
    assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)
    assert [r["status"] for r in store.requests()] == ["queued"] * 5
    assert [r["id"] for r in store.requests()] == ids  # oldest first
    assert [r["id"] for r in store.requests(limit=2)] == ids[3:]  # the newest two, still oldest first
    assert [r["id"] for r in store.requests(since=102.0)] == ids[2:]
    store.update_request(ids[0], status="running", started=100.5)
    store.update_request(ids[0], status="done", generated_tokens=9, finished=101.0)
    store.update_request(ids[1], status="failed", error="worker lost")
    assert store.requests()[0]["generated_tokens"] == 9 and store.requests()[1]["error"] == "worker lost"
    assert [r["id"] for r in store.unfinished_requests()] == ids[2:]
    with pytest.raises(ValueError, match="status"):
        store.update_request(ids[2], status="exploded")
    with pytest.raises(TypeError, match="colour"):
        store.update_request(ids[2], colour="red")
    with pytest.raises(RequestNotFound):
        store.update_request("0" * 32, status="done")
    assert store.requests()[2]["status"] == "queued"  # refused updates changed nothing


def test_migration_events_keep_what_is_there(store):
    store.add_migrations([
        {"time": 10.0, "step": 5, "epoch": 2, "layers": [0, 1], "kv_groups": [4, 5], "mlp_columns": [[0, 128]],
         "from_rank": 1, "to_rank": 0, "reason": "rank 1 is 23% slow", "step_ms_before": [30.0, 37.0],
         "step_ms_after": 31.0, "duration_s": 0.4, "bytes_moved": 123456, "stage": 1},
        {"time": 20.0, "reason": "partial event"},
    ])
    first, second = store.migrations()
    assert first["kv_groups"] == [4, 5] and first["mlp_columns"] == [[0, 128]]
    assert first["step_ms_before"] == [30.0, 37.0] and first["step_ms_after"] == 31.0  # a list or a number
    assert first["bytes_moved"] == 123456 and first["stage"] == 1  # an unknown key comes back too
    assert second["reason"] == "partial event" and "from_rank" not in second
    assert [m["time"] for m in store.migrations(since=15.0)] == [20.0]


def test_downsampling_tiers_keep_averages(store):
    t0 = 1_800_000_000.0  # a multiple of 3600, so buckets line up with the hours
    devices = ("cuda:0", "cuda:1")
    raw_rows = [sample(t0 + i, d, util=50 + 40 * math.sin(i / 50), power=100.0 + i % 60) for d in devices
                for i in range(7200)]
    store.add_samples(raw_rows)
    now = t0 + 7200.0

    assert store.downsample(now) == 2 * (7200 - 3600 - 60)
    rows = store.samples(device="cuda:0")
    minute = [r for r in rows if r["resolution_s"] == 60.0]
    assert len(minute) == 60 and len(rows) == 3660  # the first hour as 1 min averages, the last one raw
    assert all(r["time"] < now - 3600 for r in minute) and all(r["time"] >= now - 3600 for r in rows[60:])
    assert all(r["power_w"] == pytest.approx(129.5) for r in minute)  # mean of 100..159
    old_util = [s.utilisation for s in raw_rows[:3600]]
    assert sum(r["utilisation"] for r in minute) / 60 == pytest.approx(sum(old_util) / 3600, rel=1e-9)
    trace_raw = [(s.time, s.power_w) for s in raw_rows[:3600]]
    trace_avg = [(r["time"], r["power_w"]) for r in minute]
    assert energy_j(trace_avg, t0 + 30, t0 + 3570) == pytest.approx(energy_j(trace_raw, t0 + 30, t0 + 3570),
                                                                     rel=0.01)
    assert store.downsample(now) == 0  # nothing new to do: idempotent

    # A late sample in an averaged minute merges into it, weighted by the time each stands for.
    store.add_samples([sample(t0 + 0.5, "cuda:0", util=0.0, power=None)])
    assert store.downsample(now) == 1
    first = store.samples(device="cuda:0")[0]
    assert first["time"] == t0 + 30 and first["power_w"] == pytest.approx(129.5)  # no power: not averaged in
    expect = (sum(old_util[:60]) + 0.0) / 61
    assert first["utilisation"] == pytest.approx(expect, rel=1e-9)

    two_days = now + 2 * 86400
    store.downsample(two_days)
    rows = store.samples(device="cuda:1")
    assert [r["resolution_s"] for r in rows] == [900.0] * 8  # two hours as 15 min averages
    assert sum(r["power_w"] for r in rows) / 8 == pytest.approx(129.5)
    assert rows[0]["time"] == t0 + 450
    assert store.downsample(now + 31 * 86400) == 16
    assert store.samples() == []


def test_samples_filters_and_power_traces(store):
    store.add_samples([sample(10.0 + i, "cuda:0") for i in range(10)] +
                      [sample(10.0 + i, "cuda:0", node="ws2", power=None) for i in range(10)] +
                      [Sample(15.0, "ws3", "cpu:0", 80.0, 100.0, 200.0, 40.0, None, power_estimated=True)])
    assert len(store.samples(since=15.0, device="cuda:0", node="ws1")) == 5
    assert len(store.samples(until=12.0)) == 4
    traces, estimated = store.power_traces(12.0, 13.0, pad_s=1.0)
    assert set(traces) == {"ws1/cuda:0"} and len(traces["ws1/cuda:0"]) == 4 and estimated is False
    traces, estimated = store.power_traces(14.0, 16.0, pad_s=0.0)
    assert set(traces) == {"ws1/cuda:0", "ws3/cpu:0"} and estimated is True


WRITER = """
import sys
import time
from llmd.app.store import Store
s = Store(sys.argv[1], busy_timeout_s=30)
print("ready", flush=True)
sys.stdin.readline()
for i in range(200):
    s.add_request("process", "m", i)
    while i == 99 and not any(r["user"] != "process" for r in s.requests()):
        time.sleep(0.005)  # half way, wait for the threads: so the two processes' writes interleave
s.close()
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "llmd.db"
    store = Store(path, busy_timeout_s=30)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    errors: list[Exception] = []
    seen: list[int] = []
    done = threading.Event()

    def write(name: str) -> None:
        try:
            for i in range(200):
                store.add_request(name, "m", i)
                if i % 20 == 0:
                    store.add_samples([sample(time.time(), device=name)])
        except Exception as e:  # noqa: BLE001 - collected, then asserted empty
            errors.append(e)

    def read() -> None:
        try:
            while not done.is_set():
                seen.append(len(store.requests()))
        except Exception as e:  # noqa: BLE001 - collected, then asserted empty
            errors.append(e)

    try:
        assert proc.stdout.readline().strip() == "ready"
        threads = [threading.Thread(target=write, args=(f"thread{k}",)) for k in range(4)]
        reader = threading.Thread(target=read)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        for t in [*threads, reader]:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert errors == []
    rows = store.requests()
    assert len(rows) == 1000 and len({r["id"] for r in rows}) == 1000
    for name in ["process", *(f"thread{k}" for k in range(4))]:
        assert sorted(r["prompt_tokens"] for r in rows if r["user"] == name) == list(range(200))
    assert len(store.samples()) == 40
    assert seen and seen == sorted(seen)  # a reader only ever sees the count grow
    users = [r["user"] for r in sorted(rows, key=lambda r: r["created"])]
    last_process_row = len(users) - 1 - users[::-1].index("process")
    assert min(users.index(f"thread{k}") for k in range(4)) < last_process_row  # the processes interleaved
    store.close()
    with Store(path) as again:
        assert len(again.requests()) == 1000
