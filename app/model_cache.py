"""An agent's cache of the models it fetches from the host (app/models.py serves them).

Under `$LLMD_CACHE_DIR/fetched`:
  models/<model id>/   the model's small files (config, tokenizer) and its manifest: a rank's model_dir
  chunks/<sha256>      one slice of one tensor (some of its rows or columns), named by its bytes' hash
  index.sqlite         which chunk holds which slice of which model's tensor, and when it was last used

A rank reads through `FetchingReader`, which has the checkpoint reader's methods: what the cache
lacks is fetched (signed, several chunks in flight), written, then read back through its hash, so a
chunk damaged on disk is dropped and fetched again, never used. A fetch cut short leaves whole chunks
behind: the next one asks only for the rest. A rank whose share grows asks only for what it gained.
Chunks are cut at fixed boundaries of their dimension, so the same slice is the same chunks on every
machine. The cache is bounded: past its size, chunks least recently used go first.
"""

import hashlib
import http.client
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmd.engine import quant
from llmd.engine.checkpoint import SAFETENSORS_DTYPES, cache_root, staged
from llmd.engine.sharding import Read

from .client import http_base
from .models import CASTS, Manifest, ModelUnavailable, Part, Source, parts
from .security import answer_is_genuine, body_digest, signed_headers

CHUNK_BYTES = 4 << 20  # whole rows up to this much a chunk: the unit of resuming
# Columns in wider chunks: the host reads every row of a tensor to cut any of its columns, once per chunk.
COLUMN_CHUNK_BYTES = 16 << 20
IN_FLIGHT = 4
TRIES = 3
STALE_PART_S = 600  # a chunk being written is older than this only if its writer died
MAX_ANSWER = 64 << 20  # a slice answer holds at most 16 MiB (app/models.py): anything larger is refused
SOURCE_ENV, CACHE_MAX_ENV, PROGRESS_ENV = "LLMD_MODEL_SOURCE", "LLMD_CACHE_MAX_BYTES", "LLMD_FETCH_PROGRESS"
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS slices (model TEXT, tensor TEXT, kind TEXT, dim INTEGER, start INTEGER, stop INTEGER,
                                   sha256 TEXT, PRIMARY KEY (model, tensor, kind, dim, start, stop));
CREATE TABLE IF NOT EXISTS chunks (sha256 TEXT PRIMARY KEY, nbytes INTEGER, used REAL);
"""


class CorruptChunk(Exception): ...


def fetched_root() -> Path:
    return cache_root() / "fetched"


@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    sha256: str


class ChunkCache:
    """The index and the chunk files; safe across the threads and processes of one agent (SQLite in WAL
    mode, files written under a temporary name and renamed)."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root, self.max_bytes = Path(root), max_bytes
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.db.executescript(SCHEMA)
        self._sweep()

    def _sweep(self) -> None:
        """Remove what a writer killed mid-chunk left: a partial file no live writer has touched for a while."""
        for part in (self.root / "chunks").glob(".part-*"):
            try:
                if time.time() - part.stat().st_mtime > STALE_PART_S:
                    part.unlink()
            except OSError:
                pass  # another process swept it first

    @property
    def db(self) -> sqlite3.Connection:
        if getattr(self._local, "db", None) is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # A chunk lost to a power cut is fetched again, or fails its hash: no sync on every write.
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return self._local.db

    def path(self, sha: str) -> Path:
        return self.root / "chunks" / sha

    def chunks(self, model: str, tensor: str, kind: str, dim: int) -> list[Chunk]:
        rows = self.db.execute("SELECT start, stop, sha256 FROM slices WHERE model=? AND tensor=? AND kind=? AND dim=?"
                               " ORDER BY start", (model, tensor, kind, dim)).fetchall()
        return [Chunk(*r) for r in rows]

    def put(self, model: str, tensor: str, kind: str, dim: int, start: int, stop: int, data: bytes | memoryview,
            sha: str | None = None) -> Chunk:
        """Keep `data` as that slice; `sha`: its SHA-256 when the caller has it (a signed answer's)."""
        sha = sha or hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.is_file():
            fd, tmp = tempfile.mkstemp(dir=self.root / "chunks", prefix=".part-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?)", (sha, len(data), time.time()))
            self.db.execute("INSERT OR REPLACE INTO slices VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (model, tensor, kind, dim, start, stop, sha))
        return Chunk(start, stop, sha)

    def read(self, chunk: Chunk) -> bytes:
        """The chunk's bytes, checked against its name; a damaged or missing one is forgotten (CorruptChunk)."""
        try:
            data = self.path(chunk.sha256).read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != chunk.sha256:
            self.forget(chunk.sha256)
            raise CorruptChunk(chunk.sha256)
        self.db.execute("UPDATE chunks SET used=? WHERE sha256=?", (time.time(), chunk.sha256))
        return data

    def forget(self, sha: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM slices WHERE sha256=?", (sha,))
            self.db.execute("DELETE FROM chunks WHERE sha256=?", (sha,))
        self.path(sha).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM chunks").fetchone()[0]

    def evict(self, keep: set[str] = frozenset()) -> int:
        """Drop chunks least recently used first until the cache is within its bound; never one in `keep`
        (what a rank is loading now). Returns the bytes freed."""
        if self.max_bytes is None:
            return 0
        over, freed = self.total_bytes() - self.max_bytes, 0
        for sha, nbytes in self.db.execute("SELECT sha256, nbytes FROM chunks ORDER BY used").fetchall():
            if freed >= over:
                break
            if sha not in keep:
                self.forget(sha)
                freed += nbytes
        return freed


class HostClient:
    """Signed calls to the host's model server, trusting only answers it signed for this very request.

    Plain `http.client`, a kept-alive connection per thread: it reads a body of megabytes in one C loop,
    where httpx parses it in 64 KiB steps (4 MiB slices came 1.6x faster so)."""

    def __init__(self, source: Source, secret: str, timeout_s: float = 60.0):
        self.source, self.secret, self.timeout_s = source, secret, timeout_s
        self.base = http_base(source.address, source.port)
        self.bytes = 0  # answer bytes received, all calls together
        self._lock, self._local = threading.Lock(), threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = http.client.HTTPConnection(self.source.address, self.source.port, timeout=self.timeout_s)
        return self._local.conn

    def _drop(self) -> None:
        if getattr(self._local, "conn", None) is not None:
            self._local.conn.close()
            self._local.conn = None

    def _read(self, r: http.client.HTTPResponse) -> memoryview:
        """The body, into this thread's buffer, kept from one answer to the next: a fresh buffer of
        megabytes a chunk costs as much in page faults as the copy itself. Valid until the thread's next call."""
        text = r.getheader("Content-Length") or ""
        length = int(text) if text.isdigit() and len(text) < 12 else -1
        if not 0 <= length <= MAX_ANSWER:
            raise http.client.HTTPException(f"an answer of {length} bytes")
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = self._local.buf = bytearray(max(length, CHUNK_BYTES))
        view = memoryview(buf)[:length]
        if r.readinto(view) != length:
            raise http.client.IncompleteRead(b"", length)
        return view

    def call(self, method: str, path: str, payload: dict | None = None) -> bytes:
        return bytes(self.answer(method, path, payload)[0])

    def answer(self, method: str, path: str, payload: dict | None = None) -> tuple[memoryview, str]:
        """The answer's body (valid until this thread's next call) and its SHA-256, which its signature covers."""
        body = json.dumps(payload).encode() if payload is not None else b""
        last = None
        for attempt in range(TRIES):
            headers = signed_headers(self.secret, method, path, self.source.receiver, body)
            if payload is not None:
                headers["Content-Type"] = "application/json"
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                content = self._read(r)
            except (OSError, http.client.HTTPException) as e:  # cut short or refused: asked again, then given up
                self._drop()
                last = e
                time.sleep(0.2 * (attempt + 1))
                continue
            digest = body_digest(content)
            if not answer_is_genuine(self.secret, headers, r.status, r.headers, content, digest):
                raise ModelUnavailable(f"the host at {self.base} did not prove it holds the pool secret "
                                       f"({error_line(r.status, content)})")
            if r.status >= 400:
                raise ModelUnavailable(f"the host at {self.base} answered {r.status}: {error_line(r.status, content)}")
            with self._lock:
                self.bytes += len(content)
            return content, digest
        raise ModelUnavailable(f"the host at {self.base} did not answer {method} {path}: {last}")

    def manifest(self) -> Manifest:
        data = self.call("GET", f"/v1/models/{self.source.model_id}/manifest")
        try:
            m = Manifest.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelUnavailable(f"the host sent a malformed manifest ({type(e).__name__})") from None
        if m.id != self.source.model_id:
            raise ModelUnavailable(f"the host sent the manifest of {m.id}, not of {self.source.model_id}")
        return m

    def file(self, name: str) -> bytes:
        return self.call("GET", f"/v1/models/{self.source.model_id}/files/{name}")

    def slice(self, tensor: str, kind: str, dim: int, start: int, stop: int,
              group: int | None = None) -> tuple[memoryview, str]:
        """A slice's bytes (valid until this thread's next call) and their SHA-256."""
        ask = {"tensor": tensor, "kind": kind, "dim": dim, "start": start, "stop": stop}
        if group is not None:
            ask["group"] = group
        return self.answer("POST", f"/v1/models/{self.source.model_id}/slice", ask)


def prepare(source: Source, client: HostClient, root: Path | None = None, manifest: Manifest | None = None) -> Path:
    """The model's directory in the cache (small files and manifest), fetched once and checked against
    the manifest's hashes: what a rank gets as its model_dir. `manifest`: the host's, when already fetched."""
    root = root or fetched_root()
    out = root / "models" / source.model_id
    if (out / "manifest.json").is_file():
        return out
    manifest = manifest or client.manifest()
    bad = [n for n in manifest.files if not SAFE_NAME.fullmatch(n)]
    if bad:
        raise ModelUnavailable(f"the manifest names files this cache will not write: {bad[:3]}")
    with staged(out, "manifest.json") as staging:
        for name, entry in manifest.files.items():
            data = client.file(name)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ModelUnavailable(f"{name} from the host does not match its manifest")
            (staging / name).write_bytes(data)
        (staging / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    return out


@dataclass
class Progress:
    """A rank's fetch so far: written for its agent to read, printed for its log."""

    done: int = 0
    total: int = 0
    started: float = 0.0

    @property
    def rate(self) -> float:
        spent = time.monotonic() - self.started
        return self.done / spent if spent > 0 else 0.0

    @property
    def left_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def to_dict(self) -> dict:
        return {"bytes": self.done, "total": self.total, "rate": round(self.rate), "left_s": self.left_s}


@dataclass(frozen=True)
class Want:
    """A slice the cache lacks: [start, stop) along `dim` of a tensor, in `kind` (app/models.py `SliceAsk`)."""

    tensor: str
    kind: str
    dim: int
    start: int
    stop: int
    nbytes: int
    group: int | None = None

    @property
    def key(self) -> str:
        return cache_kind(self.kind, self.group)


def cache_kind(kind: str, group: int | None) -> str:
    """What the index calls a kind: int4 slices of another group size are other bytes."""
    return f"{kind}-g{group}" if kind == "int4" else kind


class FetchingReader:
    """The checkpoint reader's methods (`engine/checkpoint.py` SliceReader) over the cache, fetching
    what it lacks from the host first. Quantised slices travel quantised; with `dense` set to bf16 or
    fp16, wider dense tensors travel cast to it (the rank casts them so anyway)."""

    def __init__(self, manifest: Manifest, cache: ChunkCache, client: HostClient, dense: str = "raw",
                 model_dir: Path | None = None):
        self.manifest, self.cache, self.client, self.dense = manifest, cache, client, dense
        self.model_dir = model_dir  # the model's small files (`prepare`)
        self.model = manifest.id
        self.opened: list[str] = []  # the checkpoint's files are the host's: none is opened here
        # Kept for the reader's life: its threads keep their connections and buffers from fetch to fetch.
        self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="llmd-fetch")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    # The checkpoint reader's methods.
    def has(self, name: str) -> bool:
        return name in self.manifest.tensors

    def whole(self, name: str) -> torch.Tensor:
        shape = self.manifest.tensors[name].shape
        return self._take(name, self._dense(name), 0, [(0, shape[0])])[0].view(shape)

    def rows(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        return self._take(name, self._dense(name), 0, ranges)[0]

    def cols(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        return self._take(name, self._dense(name), 1, ranges)[0]

    def quantised(self, name: str, dim: int, ranges: list[tuple[int, int]], weights: str,
                  group: int | None = None) -> tuple[torch.Tensor, ...]:
        got = self._take(name, weights, dim, ranges, group)
        if weights == "int4":
            got[0] = quant.unpack_pairs(got[0])
        return tuple(got)

    # Fetching.
    def wants(self, reads: list[Read], group: int | None = None) -> list[Want]:
        """What the cache lacks of `reads` (engine/sharding.py `reads`; `group`: int4's), in chunks."""
        out = []
        for r in reads:
            entry = self.manifest.tensors[r.name]
            dim, ranges = (0, [(0, entry.shape[0])]) if r.dim is None else (r.dim, list(r.ranges))
            kind = self._dense(r.name) if r.form == "dense" else r.form
            out += self._missing(r.name, kind, dim, ranges, group if kind == "int4" else None)
        return out

    def fetch(self, wants: list[Want], progress: Callable[[int], None] | None = None) -> None:
        """Fetch the chunks, several in flight; each is in the cache once this returns."""
        def one(w: Want) -> None:
            data, sha = self.client.slice(w.tensor, w.kind, w.dim, w.start, w.stop, w.group)
            if len(data) != w.nbytes:
                raise ModelUnavailable(f"the host sent {len(data)} bytes of {w.tensor}, not {w.nbytes}")
            self.cache.put(self.model, w.tensor, w.key, w.dim, w.start, w.stop, data, sha)
            if progress:
                progress(len(data))

        futures = [self._pool.submit(one, w) for w in wants]
        try:
            for f in futures:
                f.result()
        finally:  # the first failure ends the fetch: what is not yet asked for is not asked for
            for f in futures:
                f.cancel()
            wait(futures)  # and what is under way ends before this returns

    def covering(self, reads: list[Read], group: int | None = None) -> set[str]:
        """The chunks in the cache that hold `reads`: what eviction must leave while they are loaded."""
        out = set()
        for r in reads:
            entry = self.manifest.tensors[r.name]
            dim, ranges = (0, [(0, entry.shape[0])]) if r.dim is None else (r.dim, list(r.ranges))
            kind = self._dense(r.name) if r.form == "dense" else r.form
            chunks = self.cache.chunks(self.model, r.name, cache_kind(kind, group if kind == "int4" else None), dim)
            out |= {c.sha256 for a, b in ranges for _, _, c in cover(a, b, chunks) if c is not None}
        return out

    def _dense(self, name: str) -> str:
        """How a dense tensor travels: cast when that narrows it, else as stored."""
        stored = SAFETENSORS_DTYPES[self.manifest.tensors[name].dtype]
        target = CASTS.get(self.dense)
        if target is None or not stored.is_floating_point or stored.itemsize <= target.itemsize:
            return "raw"
        return self.dense

    def _parts(self, name: str, kind: str, dim: int, n: int, group: int | None) -> list[Part]:
        entry = self.manifest.tensors[name]
        return parts(kind, SAFETENSORS_DTYPES[entry.dtype], entry.shape, dim, n, group)

    @staticmethod
    def _unit(kind: str, dim: int, group: int | None) -> int:
        """The fewest indices a chunk holds: int4 columns go in whole groups."""
        return group if kind == "int4" and dim == 1 else 1

    def _missing(self, name: str, kind: str, dim: int, ranges: list[tuple[int, int]],
                 group: int | None = None) -> list[Want]:
        unit = self._unit(kind, dim, group)
        per_unit = sum(p.nbytes for p in self._parts(name, kind, dim, unit, group))
        limit = COLUMN_CHUNK_BYTES if dim == 1 else CHUNK_BYTES
        block = max(1, limit // per_unit) * unit
        chunks = self.cache.chunks(self.model, name, cache_kind(kind, group), dim)
        out = []
        for a, b in ranges:
            for start, stop, chunk in cover(a, b, chunks):
                if chunk is not None:
                    continue
                # Cut at fixed multiples of `block`: the same slice is the same chunks on every machine.
                edges = sorted({start, stop, *range((start // block + 1) * block, stop, block)})
                out += [Want(name, kind, dim, s, e, sum(p.nbytes for p in self._parts(name, kind, dim, e - s, group)),
                             group) for s, e in zip(edges, edges[1:])]
        return out

    def _take(self, name: str, kind: str, dim: int, ranges: list[tuple[int, int]],
              group: int | None = None) -> list[torch.Tensor]:
        for _ in range(TRIES):
            self.fetch(self._missing(name, kind, dim, ranges, group))
            try:
                return self._assemble(name, kind, dim, ranges, group)
            except CorruptChunk:
                continue  # forgotten: the next round fetches it again
        raise ModelUnavailable(f"the chunks of {name} keep failing their checksums")

    def _assemble(self, name: str, kind: str, dim: int, ranges: list[tuple[int, int]],
                  group: int | None) -> list[torch.Tensor]:
        chunks = self.cache.chunks(self.model, name, cache_kind(kind, group), dim)
        pieces: list[list[torch.Tensor]] = []
        for a, b in ranges:
            for start, stop, chunk in cover(a, b, chunks):
                if chunk is None:
                    raise CorruptChunk(f"{name} [{start}, {stop}) went missing")
                data = bytearray(self.cache.read(chunk))
                offset, held = 0, []
                for p in self._parts(name, kind, dim, chunk.stop - chunk.start, group):
                    t = torch.frombuffer(data, dtype=torch.uint8, offset=offset, count=p.nbytes)
                    t = t.view(p.dtype).view(p.shape)
                    offset += p.nbytes
                    if p.joins is not None:
                        t = t.narrow(p.joins, (start - chunk.start) * p.num // p.den, (stop - start) * p.num // p.den)
                    held.append(t)
                pieces.append(held)
        out = []
        for i, p in enumerate(self._parts(name, kind, dim, self._unit(kind, dim, group), group)):
            column = [held[i] for held in pieces]
            # Copied out (cat copies, one view is cloned): a view would keep its whole chunk's buffer alive.
            out.append(column[0].clone() if p.joins is None or len(column) == 1 else torch.cat(column, p.joins))
        return out


def error_line(status: int, content: bytes) -> str:
    """An answer's error line, cut short: the answer may come from anyone."""
    try:
        return str(json.loads(bytes(content[:65536])).get("error"))[:300]
    except (ValueError, AttributeError):
        return f"{status}, {bytes(content[:200])!r}"


def cover(a: int, b: int, chunks: list[Chunk]) -> list[tuple[int, int, Chunk | None]]:
    """[a, b) as the pieces held chunks give (a chunk reaching furthest first) and the gaps between them."""
    out, pos = [], a
    while pos < b:
        holding = [c for c in chunks if c.start <= pos < c.stop]
        if holding:
            c = max(holding, key=lambda c: c.stop)
            end = min(c.stop, b)
            out.append((pos, end, c))
        else:
            end = min([c.start for c in chunks if pos < c.start < b] + [b])
            out.append((pos, end, None))
        pos = end
    return out


def source_to_env(source: Source) -> str:
    return json.dumps(asdict(source))


def source_from_env(text: str) -> Source:
    return Source(**json.loads(text))


class Reporter:
    """A fetch's progress: a line in the log at most every `every_s`, and a JSON file its agent reads."""

    def __init__(self, label: str, total: int, path: str | None, every_s: float = 1.0):
        self.label, self.path, self.every_s = label, path, every_s
        self.progress = Progress(total=total, started=time.monotonic())
        self._lock, self._last = threading.Lock(), 0.0

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.progress.done += nbytes
            now = time.monotonic()
            if now - self._last >= self.every_s or self.progress.done >= self.progress.total:
                self._last = now
                self.report()

    def report(self) -> None:
        p = self.progress
        left = "" if p.left_s is None else f", {p.left_s:.0f} s left"
        print(f"{self.label}: fetched {p.done / 1e6:.1f} of {p.total / 1e6:.1f} MB from the host, "
              f"{p.rate / 1e6:.1f} MB/s{left}", flush=True)
        if self.path:
            tmp = f"{self.path}.tmp"
            Path(tmp).write_text(json.dumps(p.to_dict()))
            os.replace(tmp, self.path)


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def dense_kind(dtype: str) -> str:
    """How dense tensors travel to a rank holding them in `dtype` (a RankSpec's): cast to it when narrower."""
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "raw")


def fetch_for(reader: FetchingReader, ranks: list[int], plan, weights: str, label: str,
              progress_path: str | None = None) -> Reporter:
    """Fetch everything the ranks' shards read (engine/sharding.py `reads`) that the cache lacks."""
    from llmd.engine.config import ModelConfig, load_hf_config
    from llmd.engine.sharding import reads

    cfg = ModelConfig.from_hf(load_hf_config(reader.model_dir))
    group = quant.group_size(cfg) if weights == "int4" else None
    wants: dict[Want, None] = {}  # ranks of one stage share tensors (norms): each chunk once
    asked = [r for rank in ranks for r in reads(cfg, plan, rank, weights, set(reader.manifest.tensors))]
    wants.update(dict.fromkeys(reader.wants(asked, group)))
    report = Reporter(label, sum(w.nbytes for w in wants), progress_path)
    reader.fetch(list(wants), progress=report)
    report.report()
    # Within the bound again, least recently used first, but never what these ranks are about to load (a share
    # larger than the bound keeps the cache over it until the next fetch).
    reader.cache.evict(keep=reader.covering(asked, group))
    return report


def open_fetched(model_dir: Path, source: Source, secret: str, max_bytes: int | None = None,
                 dense: str = "raw") -> FetchingReader:
    """The reader of a model an agent fetched: its manifest is in `model_dir` (see `prepare`)."""
    manifest = Manifest.from_dict(json.loads((Path(model_dir) / "manifest.json").read_text()))
    if manifest.id != source.model_id:
        raise ModelUnavailable(f"{model_dir} holds model {manifest.id}, not {source.model_id}")
    return FetchingReader(manifest, ChunkCache(fetched_root(), max_bytes), HostClient(source, secret), dense,
                          Path(model_dir))
