"""Models named by content, and their slices served to the agents that lack them.

A manifest lists a model directory's small files (config, tokenizer) and its weight files' tensors
with their byte ranges, each with a SHA-256; its id is a hash of the files' contents only, so two
machines with the same files agree on it wherever the files live. The host serves the models it
launches (`ModelServer`) on its LAN address behind the signed control plane: a manifest, a small
file, or one slice of one tensor (rows or columns of it, as `engine/sharding.py` cuts it), read with
the checkpoint's own `SliceReader`. The agents' side (cache, fetching) is app/model_cache.py.
"""

import hashlib
import json
import math
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from llmd.engine import quant
from llmd.engine.checkpoint import (INDEX_FILE, SAFETENSORS_DTYPES, SliceReader, cache_root, safetensors_header,
                                    weight_files)
from llmd.engine.errors import LlmdError

from .guard import PlainJSON, SignedApi, ThreadServer, error, plain_errors
from .security import Verifier, receiver_name

MANIFEST_FORMAT = 1
SMALL_FILE_MAX = 64 << 20  # config, tokenizer, templates: a bigger non-weight file is not part of a model
MAX_SLICE_BYTES = 16 << 20  # one answer; a larger read is several requests (app/model_cache.py chunks them)
HASH_BLOCK = 8 << 20
MODEL_ID = r"^[0-9a-f]{32}$"


class ModelUnavailable(LlmdError): ...


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str  # as safetensors writes it: F32, BF16, ...
    shape: list[int]
    offset: int  # of its first byte in the file
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]  # config, tokenizer and other small files, by name
    weights: dict[str, FileEntry]  # safetensors files, by name
    tensors: dict[str, TensorEntry]
    format: int = MANIFEST_FORMAT

    @property
    def id(self) -> str:
        return content_id(self.files, self.weights)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """A manifest as another machine sent it: its id must be the hash of what it lists."""
        m = cls(files={k: FileEntry(**v) for k, v in d["files"].items()},
                weights={k: FileEntry(**v) for k, v in d["weights"].items()},
                tensors={k: TensorEntry(**v) for k, v in d["tensors"].items()}, format=d["format"])
        if m.format != MANIFEST_FORMAT or d.get("id") != m.id:
            raise ModelUnavailable("a manifest whose id is not the hash of the files it lists")
        return m


def content_id(files: dict[str, FileEntry], weights: dict[str, FileEntry]) -> str:
    digests = {"files": {k: v.sha256 for k, v in sorted(files.items())},
               "weights": {k: v.sha256 for k, v in sorted(weights.items())}}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:32]


def small_files(model_dir: Path) -> list[Path]:
    """The files a model needs beside its weights: everything small and visible that is not a weight."""
    out = []
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".safetensors" and p.name != INDEX_FILE:
            if p.stat().st_size <= SMALL_FILE_MAX:
                out.append(p)
    return out


def hash_file(path: Path) -> FileEntry:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return FileEntry(path.stat().st_size, h.hexdigest())


def hash_weights(path: Path) -> tuple[FileEntry, dict[str, TensorEntry]]:
    """One pass over a safetensors file: its hash, and each tensor's bytes and hash."""
    header, start = safetensors_header(path)
    whole, tensors = hashlib.sha256(), {}
    with open(path, "rb") as f:
        whole.update(f.read(start))
        pos = start
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        for name, e in sorted(entries, key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = (start + o for o in e["data_offsets"])
            if a > pos:  # alignment padding between tensors: part of the file, of no tensor
                whole.update(f.read(a - pos))
            one, left = hashlib.sha256(), b - a
            while left:
                block = f.read(min(left, HASH_BLOCK))
                if not block:
                    raise ModelUnavailable(f"{path.name} ends inside tensor {name}")
                one.update(block)
                whole.update(block)
                left -= len(block)
            pos = b
            tensors[name] = TensorEntry(path.name, e["dtype"], list(e["shape"]), a, b - a, one.hexdigest())
        while block := f.read(HASH_BLOCK):
            whole.update(block)
    return FileEntry(path.stat().st_size, whole.hexdigest()), tensors


def make_manifest(model_dir: Path) -> Manifest:
    """The manifest of a model directory, hashed once per version of its files on this machine (kept in
    the cache directory under the files' names, sizes and modification times)."""
    model_dir = Path(model_dir).resolve()
    weight_names = sorted(set(weight_files(model_dir).values()))
    listed = [*small_files(model_dir), *(model_dir / n for n in weight_names)]
    stamp = hashlib.sha256(json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in listed]).encode())
    saved = cache_root() / "manifests" / f"{stamp.hexdigest()[:32]}.json"
    if saved.is_file():
        try:
            return Manifest.from_dict(json.loads(saved.read_text()))
        except (ValueError, KeyError, TypeError, ModelUnavailable):
            pass  # written by another version, or damaged: hash again
    files = {p.name: hash_file(p) for p in small_files(model_dir)}
    weights, tensors = {}, {}
    for name in weight_names:
        weights[name], held = hash_weights(model_dir / name)
        tensors.update(held)
    manifest = Manifest(files, weights, tensors)
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(manifest.to_dict()))
    tmp.replace(saved)
    return manifest


def same_sizes(model_dir: Path, manifest: Manifest) -> bool:
    """Whether a folder holds files of the manifest's names and sizes: what a folder must show before it is
    worth hashing as a copy of that model (a different one at the same path is seen at once)."""
    model_dir = Path(model_dir)
    small = {p.name: p.stat().st_size for p in small_files(model_dir)}
    weights = {p.name: p.stat().st_size for p in model_dir.glob("*.safetensors")}
    return (small == {k: v.size for k, v in manifest.files.items()}
            and weights == {k: v.size for k, v in manifest.weights.items()})


# What a launch request carries for an agent to find the model: where to fetch it, and its id.
@dataclass(frozen=True)
class Source:
    address: str
    port: int
    server_id: str
    model_id: str

    @property
    def receiver(self) -> str:
        return receiver_name(self.server_id, self.address, self.port)


CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SliceAsk(BaseModel):
    """One slice: rows [start, stop) (dim 0) or columns (dim 1) of a tensor, or the tensor whole (dim
    null), in `kind`: as stored, cast, or quantised as the engine quantises it (int4 in groups of `group`)."""

    model_config = ConfigDict(extra="forbid")
    tensor: str = Field(min_length=1, max_length=512)
    dim: int | None = Field(default=None, ge=0, le=1)
    start: int = Field(default=0, ge=0, le=1 << 40)
    stop: int = Field(default=0, ge=0, le=1 << 40)
    kind: str = Field(default="raw", pattern=r"^(raw|bf16|fp16|int8|int4)$")
    group: int | None = Field(default=None, ge=1, le=4096)


@dataclass(frozen=True)
class Part:
    """One tensor of a slice as it travels and is cached. A slice of n indices along the split dimension
    holds n * num / den of them along `joins` (int4: two values a byte, a scale a group); `joins` None:
    the part is the same whatever the slice (int8 column slices carry their whole rows' scales)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    joins: int | None
    num: int = 1
    den: int = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parts(kind: str, dtype: torch.dtype, shape: list[int], dim: int, n: int, group: int | None = None) -> list[Part]:
    """What a slice of `n` indices along `dim` of a tensor holds, in the order it is sent. ValueError: the
    kind does not apply to this tensor."""
    held = [*shape]
    held[dim] = n
    if kind == "raw":
        return [Part(dtype, tuple(held), dim)]
    if not dtype.is_floating_point:
        raise ValueError(f"{kind} is for floating-point tensors, not {dtype}")
    if kind in CASTS:
        return [Part(CASTS[kind], tuple(held), dim)]
    if len(shape) != 2:
        raise ValueError(f"{kind} is for 2-D weights, not shape {shape}")
    rows, cols = held
    if kind == "int8":
        return [Part(torch.int8, (rows, cols), dim), Part(torch.bfloat16, (rows,), 0 if dim == 0 else None)]
    if kind != "int4" or group not in quant.GROUP_SIZES or cols % group:
        raise ValueError(f"int4 needs a group of {' or '.join(map(str, quant.GROUP_SIZES))} dividing its {cols} inputs")
    groups = Part(torch.bfloat16, (rows, cols // group), dim, 1, group if dim == 1 else 1)
    return [Part(torch.uint8, (rows, cols // 2), dim, 1, 2 if dim == 1 else 1), groups, groups]


def answer_parts(entry: TensorEntry, ask: SliceAsk) -> list[Part]:
    """The parts of an asked slice; ValueError when it is not a slice of the tensor."""
    if entry.dtype not in SAFETENSORS_DTYPES or not entry.shape or 0 in entry.shape:
        raise ValueError(f"a {entry.dtype} tensor of shape {entry.shape} is not served in slices")
    dtype = SAFETENSORS_DTYPES[entry.dtype]
    if ask.dim is None:
        return parts(ask.kind, dtype, entry.shape, 0, entry.shape[0], ask.group)
    if ask.dim >= len(entry.shape) or not 0 <= ask.start < ask.stop <= entry.shape[ask.dim]:
        raise ValueError(f"[{ask.start}, {ask.stop}) is not a range of dimension {ask.dim} of shape {entry.shape}")
    if ask.dim == 1 and len(entry.shape) != 2:
        raise ValueError("columns are taken of 2-D tensors")
    if ask.kind == "int4" and ask.dim == 1 and (ask.start % (ask.group or 1) or ask.stop % (ask.group or 1)):
        raise ValueError("int4 columns go in whole groups")
    return parts(ask.kind, dtype, entry.shape, ask.dim, ask.stop - ask.start, ask.group)


def read_slice(reader: SliceReader, entry: TensorEntry, ask: SliceAsk) -> memoryview | bytes:
    dim = 0 if ask.dim is None else ask.dim
    ranges = [(0, entry.shape[0])] if ask.dim is None else [(ask.start, ask.stop)]
    if ask.kind in quant.QUANTISED:
        tensors = reader.quantised(ask.tensor, dim, ranges, ask.kind, ask.group)
        if ask.kind == "int4":
            tensors = (quant.pack_pairs(tensors[0]), *tensors[1:])
    else:
        t = (reader.rows if dim == 0 else reader.cols)(ask.tensor, ranges)
        tensors = (t.to(CASTS[ask.kind]) if ask.kind in CASTS else t,)
    views = [memoryview(t.contiguous().view(torch.uint8).numpy()) for t in tensors]
    return views[0] if len(views) == 1 else b"".join(views)  # one tensor is sent as it is: no copy


@dataclass
class Offered:
    model_dir: Path
    manifest: Manifest
    local: threading.local = field(default_factory=threading.local)  # a SliceReader per serving thread
    readers: list[SliceReader] = field(default_factory=list)  # all of them, closed with the server
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reader(self) -> SliceReader:
        if getattr(self.local, "r", None) is None:
            self.local.r = SliceReader(self.model_dir)
            with self.lock:
                self.readers.append(self.local.r)
        return self.local.r

    def close(self) -> None:
        with self.lock:
            for r in self.readers:
                r.__exit__(None, None, None)
            self.readers = []


def create_app(models: dict[str, Offered]):
    """The model API, behind `SignedApi`: only agents of the pool get a byte."""
    app = FastAPI(title="llmd models", default_response_class=PlainJSON, openapi_url=None, docs_url=None,
                  redoc_url=None)
    plain_errors(app)

    def offered(model_id: str) -> Offered | None:
        return models.get(model_id)

    @app.get("/v1/models/{model_id}/manifest")
    def manifest(model_id: str):
        m = offered(model_id)
        return error(404, "no such model here") if m is None else m.manifest.to_dict()

    @app.get("/v1/models/{model_id}/files/{name}")
    def small_file(model_id: str, name: str):
        m = offered(model_id)
        if m is None or name not in m.manifest.files:
            return error(404, "no such model file here")
        try:
            return Response((m.model_dir / name).read_bytes(), media_type="application/octet-stream")
        except OSError:
            return error(404, "that model file is gone from the host")

    @app.post("/v1/models/{model_id}/slice")
    def one_slice(model_id: str, ask: SliceAsk):
        m = offered(model_id)
        if m is None or ask.tensor not in m.manifest.tensors:
            return error(404, "no such model or tensor here")
        entry = m.manifest.tensors[ask.tensor]
        try:
            size = sum(p.nbytes for p in answer_parts(entry, ask))
        except ValueError as e:
            return error(400, str(e))
        if size > MAX_SLICE_BYTES:
            return error(413, f"a slice of {size} bytes is over the {MAX_SLICE_BYTES} an answer holds: ask in parts")
        try:
            return Response(read_slice(m.reader(), entry, ask), media_type="application/octet-stream")
        except OSError:  # the file changed or went since the manifest was made
            return error(409, "the model's files changed on the host since it was offered: relaunch")

    return app


class ModelServer:
    """The host's models, served on its LAN address to the pool's agents while a launch runs."""

    def __init__(self, address: str, secret: str):
        self.server_id = uuid.uuid4().hex[:16]
        self.models: dict[str, Offered] = {}
        self._server = ThreadServer(address)
        self.address, self.port = self._server.address, self._server.port
        verifier = Verifier(secret, receiver_name(self.server_id, self.address, self.port))
        # Answers are signed whole, so they are held whole: a slice is capped to keep that small.
        self._server.start(SignedApi(create_app(self.models), verifier))

    def offer(self, model_dir: Path) -> Source:
        manifest = make_manifest(model_dir)
        self.models.setdefault(manifest.id, Offered(Path(model_dir), manifest))
        return Source(self.address, self.port, self.server_id, manifest.id)

    def close(self) -> None:
        self._server.close()
        for m in self.models.values():
            m.close()


# ---- a folder of models (`llmd up --models-dir`)

@dataclass(frozen=True)
class Found:
    """A model in a models folder: what `--model` takes for it, and its weights' size on disk."""

    name: str
    path: str
    bytes: int
    config: Path | None  # its config.json; None for a GGUF file (converted on first use)


def find_models(root: Path) -> list[Found]:
    """Every model directly in `root`: Hugging Face folders (config.json and safetensors weights), GGUF files,
    and the snapshots of a Hugging Face cache (`root` is one, or holds `hub/`)."""
    root = Path(root).expanduser()
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_file() and p.suffix == ".gguf":
            out.append(Found(p.stem, str(p), p.stat().st_size, None))
        elif p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            out.append(Found(p.name, str(p), _weights_bytes(p), p / "config.json"))
        elif p.is_dir() and p.name.startswith("models--") and (p / "refs" / "main").is_file():
            snapshot = p / "snapshots" / (p / "refs" / "main").read_text().strip()
            if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
                name = p.name.removeprefix("models--").replace("--", "/")
                out.append(Found(name, str(snapshot), _weights_bytes(snapshot), snapshot / "config.json"))
        elif p.is_dir() and p.name == "hub":
            out += find_models(p)
    return out


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
