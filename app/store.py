"""The SQLite store: nodes, GPUs, samples, requests, plans, migrations, settings.

One file (`default_db_path()`: `$LLMD_DB`, else the user's data directory; the
CLI's `--db` flag overrides both), in WAL mode so readers never wait for the
writer. The schema is created and migrated here: `PRAGMA user_version` holds
the version and `MIGRATIONS` is the ordered list of steps that reach it.

Concurrency follows datasette: one write connection behind a lock, every write
a `BEGIN IMMEDIATE` transaction (so two processes on one file queue up on the
busy timeout instead of failing half way); reads go through one read-only
connection per thread, so a Gradio worker never blocks on the sampler.

A file that is not SQLite, is damaged, is locked past the busy timeout or was
written by a newer llmd raises a `StoreError` subclass naming the file and what
to do. The store never deletes, truncates or rewrites a file it cannot read.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import sqlite_utils

from llmd.app.security import data_dir
from llmd.engine.errors import LlmdError


class StoreError(LlmdError): ...


class StoreCorrupt(StoreError): ...


class StoreLocked(StoreError): ...


class StoreTooNew(StoreError): ...


class RequestNotFound(StoreError): ...


class KeyExists(StoreError): ...


class KeyNotFound(StoreError): ...


SAMPLE_PERIOD_S = 1.0  # a raw sample stands for one sampler period
# Downsampling tiers: (age from which they apply, resolution in seconds).
TIERS = ((3600.0, 60.0), (86400.0, 900.0))
KEEP_S = 30 * 86400.0  # samples older than this are dropped
REQUEST_STATUSES = ("queued", "running", "done", "cancelled", "failed")
REQUEST_FIELDS = ("status", "started", "generated_tokens", "ttft_s", "decode_tokens_per_s", "energy_j",
                  "energy_estimated", "cost", "error", "finished", "busy_s")
MIGRATION_COLUMNS = ("time", "step", "epoch", "layers", "kv_groups", "mlp_columns", "from_rank", "to_rank",
                     "reason", "step_ms_before", "step_ms_after", "duration_s", "bytes_moved")
MIGRATION_JSON = ("layers", "kv_groups", "mlp_columns")


def default_db_path() -> Path:
    """`$LLMD_DB` if set, else `$XDG_DATA_HOME/llmd/llmd.db` (or `~/.local/share/llmd/llmd.db`)."""
    env = os.environ.get("LLMD_DB")
    return Path(env).expanduser() if env else data_dir() / "llmd.db"


@dataclass
class Settings:
    electricity_per_kwh: float = 0.30
    currency: str = "EUR"
    node_hourly: dict[str, float] = field(default_factory=dict)  # node id -> price per hour
    cpu_tdp_w: float = 65.0  # for the CPU power estimate


@dataclass
class Sample:
    """One reading of one device."""

    time: float
    node: str
    device: str  # e.g. "cuda:0" or "cpu:0"
    utilisation: float  # percent 0..100
    memory_used_mb: float
    memory_total_mb: float
    power_w: float | None
    temperature_c: float | None
    power_estimated: bool = False


# ---- schema -----------------------------------------------------------------------------------------------------

def _schema_v1(db: sqlite_utils.Database) -> None:
    """The tables the issue lists: nodes, gpus, gpu_samples, requests, plans, migrations, settings."""
    db["nodes"].create({"id": str, "name": str, "address": str, "port": int, "joined": int, "devices": str,
                        "first_seen": float, "last_seen": float}, pk="id")
    db["gpus"].create({"node": str, "device": str, "name": str, "memory_total_mb": float, "updated": float},
                      pk=("node", "device"))
    db["gpu_samples"].create({"id": int, "time": float, "node": str, "device": str, "utilisation": float,
                              "memory_used_mb": float, "memory_total_mb": float, "power_w": float,
                              "temperature_c": float}, pk="id")
    db["gpu_samples"].create_index(["time"])
    db["requests"].create({"id": str, "created": float, "user": str, "model": str, "prompt": str,
                           "prompt_tokens": int, "generated_tokens": int, "status": str, "ttft_s": float,
                           "decode_tokens_per_s": float, "energy_j": float, "cost": float, "error": str,
                           "finished": float}, pk="id")
    db["plans"].create({"id": int, "time": float, "plan": str, "predicted": str}, pk="id")
    db["migrations"].create({"id": int, "time": float, "step": int, "epoch": int, "layers": str, "kv_groups": str,
                             "mlp_columns": str, "from_rank": int, "to_rank": int, "reason": str,
                             "step_ms_before": float, "step_ms_after": float, "duration_s": float,
                             "bytes_moved": int}, pk="id")
    db["settings"].create({"key": str, "value": str}, pk="key")


def _schema_v2(db: sqlite_utils.Database) -> None:
    """Tiered downsampling, estimated-power flags, the balancer's per-rank step times."""
    samples = db["gpu_samples"]
    # Existing rows are raw readings: one sampler period each, measured power.
    samples.add_column("resolution_s", float, not_null_default=SAMPLE_PERIOD_S)
    samples.add_column("power_estimated", int, not_null_default=0)
    samples.create_index(["node", "device", "time"])
    requests = db["requests"]
    requests.add_column("started", float)
    requests.add_column("energy_estimated", int, not_null_default=0)
    requests.create_index(["created"])
    requests.create_index(["status"])
    db["migrations"].add_column("extra", str)  # event keys this schema has no column for, as JSON
    db["rank_steps"].create({"time": float, "rank": int, "step_ms": float})
    db["rank_steps"].create_index(["time"])


def _schema_v3(db: sqlite_utils.Database) -> None:
    """API keys (hashed), which key each request came with, and each request's busy seconds (its share of
    the steps it was batched in: what its node-hour cost is counted on)."""
    db["requests"].add_column("api_key", str)
    db["requests"].add_column("busy_s", float)
    db["api_keys"].create({"name": str, "hash": str, "created": float, "revoked": float}, pk="name")
    db["api_keys"].create_index(["hash"], unique=True)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_schema_v1, _schema_v2, _schema_v3]
SCHEMA_VERSION = len(MIGRATIONS)


# ---- errors -----------------------------------------------------------------------------------------------------

def _store_error(path: Path, e: sqlite3.Error, busy_timeout_s: float) -> StoreError:
    """Turn an sqlite3 error into one line: which file, what is wrong, what to do."""
    msg = " ".join(str(e).split())  # one line, whatever SQLite put in it
    low = msg.lower()
    if "not a database" in low:
        return StoreCorrupt(f"{path} is not an SQLite database ({msg}); move it away or pass --db "
                            "(or set LLMD_DB) to use another file")
    if "malformed" in low or "corrupt" in low:
        return StoreCorrupt(f"{path} is damaged ({msg}); keep a copy, try `sqlite3 {path} .recover`, "
                            "or pass --db to use another file")
    if "locked" in low or "busy" in low:
        return StoreLocked(f"{path} is locked by another process for more than {busy_timeout_s:g} s ({msg}); "
                           "stop the other program using it, or pass --db to use another file")
    if "readonly" in low or "unable to open" in low or "permission" in low:
        return StoreError(f"cannot open {path} for writing ({msg}); check its permissions or pass --db")
    return StoreError(f"{path}: SQLite error: {msg}")


def _dict(row: sqlite3.Row) -> dict[str, Any]:
    return dict(zip(row.keys(), row, strict=True))


def _json(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def _unjson(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


# ---- the store --------------------------------------------------------------------------------------------------

class Store:
    """The app's one SQLite file. Thread-safe; several processes may share one file."""

    def __init__(self, path: Path | str, busy_timeout_s: float = 5.0):
        self.path = Path(path).expanduser()
        self.busy_timeout_s = busy_timeout_s
        self._write_lock = threading.Lock()
        self._readers: dict[threading.Thread, sqlite3.Connection] = {}
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of {self.path} ({e}); pass --db to use another file") from e
        self._conn = self._connect()
        try:
            with self._errors():
                self.schema_version = self._open_checked()
        except BaseException:
            self._conn.close()
            raise

    # -- connections

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise _store_error(self.path, e, self.busy_timeout_s) from e
        conn.row_factory = sqlite3.Row
        return conn

    def _open_checked(self) -> int:
        """Read-only checks first, so a file we refuse is never written to; then WAL and migrations."""
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]  # fails on a non-SQLite file
        if version > SCHEMA_VERSION:
            raise StoreTooNew(f"{self.path} has schema version {version}, newer than this llmd knows "
                              f"({SCHEMA_VERSION}); upgrade llmd, or pass --db to use another file")
        check = " ".join(self._conn.execute("PRAGMA quick_check(1)").fetchone()[0].split())
        if check != "ok":
            raise StoreCorrupt(f"{self.path} is damaged ({check}); keep a copy, try `sqlite3 {self.path} "
                               ".recover`, or pass --db to use another file")
        self._db = sqlite_utils.Database(self._conn, execute_plugins=False)
        self._db.enable_wal()
        # In WAL mode NORMAL survives any crash of the app; only a power cut may lose the last commits.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            version = self._migrate()
        return version

    def _migrate(self) -> int:
        with self._write() as db:
            # Read again under the write lock: another process may have migrated meanwhile.
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreTooNew(f"{self.path} has schema version {version}, newer than this llmd knows "
                                  f"({SCHEMA_VERSION}); upgrade llmd, or pass --db to use another file")
            for step in MIGRATIONS[version:]:
                step(db)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return SCHEMA_VERSION

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (WAL lets it read while the writer writes)."""
        me = threading.current_thread()
        with self._readers_lock:
            if self._closed:
                raise StoreError(f"{self.path}: the store is closed")
            conn = self._readers.get(me)
            if conn is None:
                for thread in [t for t in self._readers if not t.is_alive()]:
                    self._readers.pop(thread).close()  # a finished thread's connection
                conn = self._connect()
                conn.execute("PRAGMA query_only = 1")
                self._readers[me] = conn
            return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise _store_error(self.path, e, self.busy_timeout_s) from e

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction on the one write connection."""
        with self._write_lock, self._errors():
            if self._closed:
                raise StoreError(f"{self.path}: the store is closed")
            self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now, waiting up to the busy timeout
            try:
                yield self._db
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._errors():
            return [_dict(r) for r in self._reader().execute(sql, params).fetchall()]

    def close(self) -> None:
        with self._write_lock, self._readers_lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._readers.values():
                conn.close()
            self._readers.clear()
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- nodes and devices

    def upsert_node(self, node_id: str, name: str, address: str, port: int, joined: bool,
                    devices: list[dict]) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO nodes (id, name, address, port, joined, devices, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name = excluded.name, "
                "address = excluded.address, port = excluded.port, joined = excluded.joined, "
                "devices = excluded.devices, last_seen = excluded.last_seen",
                (node_id, name, address, port, int(joined), json.dumps(devices), now, now))

    def nodes(self) -> list[dict]:
        rows = self._query("SELECT * FROM nodes ORDER BY id")
        for r in rows:
            r["joined"], r["devices"] = bool(r["joined"]), _unjson(r["devices"]) or []
        return rows

    def upsert_gpu(self, node: str, device: str, name: str, memory_total_mb: float) -> None:
        with self._write() as db:
            db["gpus"].upsert({"node": node, "device": device, "name": name, "memory_total_mb": memory_total_mb,
                               "updated": time.time()}, pk=("node", "device"))

    def gpus(self) -> list[dict]:
        return self._query("SELECT * FROM gpus ORDER BY node, device")

    # -- samples

    def add_samples(self, samples: list[Sample]) -> None:
        rows = [{**asdict(s), "power_estimated": int(s.power_estimated), "resolution_s": SAMPLE_PERIOD_S}
                for s in samples]
        if rows:
            with self._write() as db:
                db["gpu_samples"].insert_all(rows)

    def samples(self, since: float | None = None, device: str | None = None, node: str | None = None,
                until: float | None = None) -> list[dict]:
        """Samples oldest first, as dicts with the `Sample` fields and `resolution_s` (1 s raw, or an average)."""
        cols = ", ".join([f.name for f in fields(Sample)] + ["resolution_s"])
        where, params = _where(("time >=", since), ("time <", until), ("device =", device), ("node =", node))
        rows = self._query(f"SELECT {cols} FROM gpu_samples{where} ORDER BY time, id", params)
        for r in rows:
            r["power_estimated"] = bool(r["power_estimated"])
        return rows

    def downsample(self, now: float | None = None) -> int:
        """Average old samples into coarser rows, drop the oldest; returns how many rows fewer there are.

        Tiers by age: younger than 1 h keeps every 1 s sample; 1 h to 1 day keeps 1 min averages; 1 day to
        30 days keeps 15 min averages; older than 30 days is dropped. An average row sits at the middle of
        its bucket (buckets aligned to multiples of the resolution, per node and device) and weighs its
        inputs by the time each stands for, so repeated runs and late samples merge instead of piling up.
        Power and temperature average over the rows that have them; memory total keeps the largest.
        """
        now = time.time() if now is None else now
        with self._write() as db:
            before = db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0]
            db.execute("DELETE FROM gpu_samples WHERE time < ?", (now - KEEP_S,))
            for age, res in reversed(TIERS):  # coarsest first: month-old raw rows go straight to 15 min
                cutoff = (now - age) // res * res  # only whole buckets, so one is never split in two
                _average_buckets(db, res, cutoff)
            after = db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0]
        return before - after

    def power_traces(self, start: float, end: float, pad_s: float = 60.0) -> tuple[dict[str, list], bool]:
        """Power per device over [start - pad, end + pad]: ({"node/device": [(time, watts)]}, any estimated).

        The padding brings in the samples just outside the interval, so `costs.energy_j` can interpolate
        at its edges even for a request shorter than one sampler period.
        """
        rows = self._query("SELECT time, node, device, power_w, power_estimated FROM gpu_samples "
                           "WHERE time >= ? AND time <= ? AND power_w IS NOT NULL ORDER BY time, id",
                           (start - pad_s, end + pad_s))
        traces: dict[str, list] = {}
        for r in rows:
            traces.setdefault(f"{r['node']}/{r['device']}", []).append((r["time"], r["power_w"]))
        return traces, any(r["power_estimated"] for r in rows)

    # -- requests, journalled before they run

    def add_request(self, user: str, model: str, prompt_tokens: int, prompt: str = "",
                    created: float | None = None, api_key: str | None = None) -> str:
        """`api_key`: the name of the key an API request came with (None: the web page, or an open API)."""
        request_id = uuid.uuid4().hex
        with self._write() as db:
            db["requests"].insert({"id": request_id, "created": time.time() if created is None else created,
                                   "user": user, "model": model, "prompt": prompt, "prompt_tokens": prompt_tokens,
                                   "generated_tokens": 0, "status": "queued", "energy_estimated": 0,
                                   "api_key": api_key})
        return request_id

    def update_request(self, request_id: str, **changes: Any) -> None:
        """Set some of `REQUEST_FIELDS` on one request; an unknown field or status is a programming error."""
        unknown = set(changes) - set(REQUEST_FIELDS)
        if unknown:
            raise TypeError(f"update_request() got unknown fields {sorted(unknown)}; known: {REQUEST_FIELDS}")
        if "status" in changes and changes["status"] not in REQUEST_STATUSES:
            raise ValueError(f"request status {changes['status']!r} is not one of {REQUEST_STATUSES}")
        if "energy_estimated" in changes:
            changes["energy_estimated"] = int(bool(changes["energy_estimated"]))
        if not changes:
            return
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._write() as db:
            cursor = db.execute(f"UPDATE requests SET {sets} WHERE id = ?", (*changes.values(), request_id))
            if cursor.rowcount == 0:
                raise RequestNotFound(f"{self.path} has no request {request_id}; it was never journalled")

    def requests(self, since: float | None = None, limit: int | None = None) -> list[dict]:
        """Requests created at or after `since`, oldest first; with `limit`, the newest `limit` of them."""
        where, params = _where(("created >=", since))
        sql = f"SELECT * FROM requests{where} ORDER BY created DESC, rowid DESC"
        if limit is not None:
            sql, params = sql + " LIMIT ?", (*params, int(limit))
        return [_request_row(r) for r in reversed(self._query(sql, params))]

    def unfinished_requests(self) -> list[dict]:
        """Queued or running requests, oldest first: what to replay after a restart or a lost worker."""
        rows = self._query("SELECT * FROM requests WHERE status IN ('queued', 'running') ORDER BY created, rowid")
        return [_request_row(r) for r in rows]

    # -- API keys: only a hash of each is kept

    def add_key(self, name: str, key_hash: str) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone():
                raise KeyExists(f"a key named {name!r} exists already (revoked keys keep their name)")
            db["api_keys"].insert({"name": name, "hash": key_hash, "created": time.time(), "revoked": None})

    def revoke_key(self, name: str) -> None:
        with self._write() as db:
            cursor = db.execute("UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                                (time.time(), name))
            if cursor.rowcount == 0:
                raise KeyNotFound(f"no live key named {name!r}; `llmd keys list` shows them")

    def keys(self) -> list[dict]:
        """Every key's name, creation and revocation times, oldest first (never the hash)."""
        return self._query("SELECT name, created, revoked FROM api_keys ORDER BY created, rowid")

    def key_named_by_hash(self, key_hash: str) -> str | None:
        """The live key with this hash, by name; None when there is none (or it was revoked)."""
        rows = self._query("SELECT name FROM api_keys WHERE hash = ? AND revoked IS NULL", (key_hash,))
        return rows[0]["name"] if rows else None

    def any_live_key(self) -> bool:
        return bool(self._query("SELECT 1 FROM api_keys WHERE revoked IS NULL LIMIT 1"))

    # -- plans and migrations

    def add_plan(self, plan: dict, predicted: dict | None = None) -> int:
        with self._write() as db:
            cursor = db.execute("INSERT INTO plans (time, plan, predicted) VALUES (?, ?, ?)",
                                (time.time(), json.dumps(plan), None if predicted is None else json.dumps(predicted)))
            return cursor.lastrowid

    def latest_plan(self) -> dict | None:
        rows = self._query("SELECT * FROM plans ORDER BY id DESC LIMIT 1")
        if not rows:
            return None
        r = rows[0]
        return {"id": r["id"], "time": r["time"], "plan": _unjson(r["plan"]), "predicted": _unjson(r["predicted"])}

    def add_migrations(self, events: list[dict]) -> None:
        """Store the balancer's events; missing keys stay NULL, lists become JSON, unknown keys go to `extra`."""
        rows = []
        for e in events:
            row = {k: _json(e[k]) for k in MIGRATION_COLUMNS if k in e}
            extra = {k: v for k, v in e.items() if k not in MIGRATION_COLUMNS}
            row["extra"] = json.dumps(extra) if extra else None
            rows.append(row)
        if rows:
            with self._write() as db:
                for row in rows:  # rows differ in their keys; one insert each keeps the missing ones NULL
                    cols = ", ".join(row)
                    db.execute(f"INSERT INTO migrations ({cols}) VALUES ({', '.join('?' * len(row))})",
                               tuple(row.values()))

    def migrations(self, since: float | None = None) -> list[dict]:
        """Balancer events oldest first, with the keys they were stored with (lists decoded)."""
        where, params = _where(("time >=", since))
        out = []
        for r in self._query(f"SELECT * FROM migrations{where} ORDER BY time, id", params):
            extra = _unjson(r.pop("extra")) or {}
            event = {k: v for k, v in r.items() if v is not None}
            for k in MIGRATION_JSON + ("step_ms_before", "step_ms_after"):
                if isinstance(event.get(k), str):  # a list stored as JSON (step times may be per rank)
                    event[k] = json.loads(event[k])
            out.append({**event, **extra})
        return out

    def add_rank_steps(self, time: float, rank_step_ms: list[float]) -> None:
        rows = [{"time": time, "rank": rank, "step_ms": ms} for rank, ms in enumerate(rank_step_ms)]
        if rows:
            with self._write() as db:
                db["rank_steps"].insert_all(rows)

    def rank_steps(self, since: float | None = None) -> list[dict]:
        where, params = _where(("time >=", since))
        return self._query(f"SELECT time, rank, step_ms FROM rank_steps{where} ORDER BY time, rank", params)

    # -- settings

    def settings(self) -> Settings:
        """The saved settings; a key missing from the file keeps its default, an unknown one is ignored."""
        known = {f.name for f in fields(Settings)}
        values = {r["key"]: json.loads(r["value"]) for r in self._query("SELECT key, value FROM settings")}
        return Settings(**{k: v for k, v in values.items() if k in known})

    def save_settings(self, settings: Settings) -> None:
        with self._write() as db:
            db["settings"].upsert_all([{"key": k, "value": json.dumps(v)} for k, v in asdict(settings).items()],
                                      pk="key")


def _where(*conditions: tuple[str, Any]) -> tuple[str, tuple]:
    """A WHERE clause from ("column op", value) pairs, skipping those whose value is None."""
    used = [(c, v) for c, v in conditions if v is not None]
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(f"{c} ?" for c, _ in used), tuple(v for _, v in used)


def _request_row(r: dict) -> dict:
    r["energy_estimated"] = bool(r["energy_estimated"])
    return r


def _average_buckets(db: sqlite_utils.Database, res: float, cutoff: float) -> None:
    """Replace the rows before `cutoff` that are finer than `res` by one weighted average per bucket."""
    db.execute("DROP TABLE IF EXISTS temp.ds_groups")
    # Buckets holding at least one row finer than this tier; rows already at this tier join their bucket.
    db.execute("CREATE TEMP TABLE ds_groups AS SELECT DISTINCT node, device, CAST(time / ? AS INTEGER) AS bucket "
               "FROM gpu_samples WHERE time < ? AND resolution_s < ?", (res, cutoff, res))
    db.execute("CREATE INDEX temp.ds_groups_key ON ds_groups (node, device, bucket)")
    last_id = db.execute("SELECT coalesce(max(id), 0) FROM gpu_samples").fetchone()[0]
    picked = ("FROM gpu_samples s JOIN ds_groups g ON s.node = g.node AND s.device = g.device "
              "AND CAST(s.time / :res AS INTEGER) = g.bucket "
              "WHERE s.time < :cutoff AND s.resolution_s <= :res AND s.id <= :last_id")
    params = {"res": res, "cutoff": cutoff, "last_id": last_id}
    w = "s.resolution_s"
    db.execute(
        "INSERT INTO gpu_samples (time, node, device, utilisation, memory_used_mb, memory_total_mb, power_w, "
        "temperature_c, power_estimated, resolution_s) "
        f"SELECT g.bucket * :res + :res / 2.0, g.node, g.device, sum(s.utilisation * {w}) / sum({w}), "
        f"sum(s.memory_used_mb * {w}) / sum({w}), max(s.memory_total_mb), "
        f"sum(s.power_w * {w}) / sum(CASE WHEN s.power_w IS NOT NULL THEN {w} END), "
        f"sum(s.temperature_c * {w}) / sum(CASE WHEN s.temperature_c IS NOT NULL THEN {w} END), "
        f"max(s.power_estimated), :res {picked} GROUP BY g.node, g.device, g.bucket", params)
    db.execute(f"DELETE FROM gpu_samples WHERE id IN (SELECT s.id {picked})", params)
    db.execute("DROP TABLE temp.ds_groups")
