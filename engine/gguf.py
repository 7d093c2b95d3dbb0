"""A GGUF file -> a bfloat16 safetensors directory, streamed one tensor at a time.

transformers' own GGUF loading dequantises the whole model to fp32 before anything can be saved. Here
each tensor is dequantised a few rows at a time, rounded to bfloat16 and written straight into the
file, whose header is written first (every shape is in the GGUF's metadata): memory holds one tensor,
never the model. Names, llama.cpp's Q/K row order and the config come from transformers' GGUF code
itself, so the result holds what `from_pretrained(gguf_file=..., dtype=torch.bfloat16)` loads.
"""

import json
import math
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    LlamaTensorProcessor,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

from .config import ModelConfig
from .errors import UnsupportedModel

CHUNK_VALUES = 1 << 20  # dequantised at a time: 4 MiB of fp32 beside the tensor
# Processors that rename nothing and reorder within one tensor: the ones a stream can apply.
STREAMABLE = (TensorProcessor, LlamaTensorProcessor)
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Entry:
    """One tensor to write: where it is in the GGUF, its Hugging Face name and shape."""

    source: ReaderTensor
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bfloat16


def convert(gguf_path: Path, out: Path) -> None:
    """Write model.safetensors, config.json, generation_config.json and the tokenizer into `out`."""
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    ModelConfig.from_hf(config)  # an unsupported model fails here, not after the conversion
    write_weights(gguf_path, config, out / WEIGHTS_FILE)
    write_config(config, out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)  # reads no tensor


def write_weights(gguf_path: Path, config: PretrainedConfig, path: Path) -> None:
    reader = GGUFReader(gguf_path)  # memory-mapped: a tensor's bytes are read when it is dequantised
    processor = tensor_processor(reader, config)
    entries = plan_tensors(reader, config, processor)
    total = sum(e.nbytes for e in entries)
    print(f"llmd: converting {gguf_path.name} to bfloat16 safetensors ({len(entries)} tensors, "
          f"{total / 2**20:.0f} MiB), once: later starts read the cached copy", file=sys.stderr, flush=True)
    write_safetensors(path, entries, lambda e: read_tensor(reader, e, processor))


def tensor_processor(reader: GGUFReader, config: PretrainedConfig) -> TensorProcessor:
    """transformers' per-architecture fix-up of the tensors llama.cpp rewrote (the Q/K row permutation)."""
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    if type(processor) not in STREAMABLE:
        raise UnsupportedModel(f"GGUF architecture {architecture!r} is not supported")
    return processor


def plan_tensors(reader: GGUFReader, config: PretrainedConfig, processor: TensorProcessor) -> list[Entry]:
    """The tensors to write, in file order: those transformers maps to a parameter, less a tied LM head."""
    hf_names = hf_name_map(config, processor)
    tied = getattr(config, "tie_word_embeddings", False)
    entries = []
    for t in reader.tensors:
        name = hf_names.get(t.name)
        if name is None or (tied and name == "lm_head.weight"):
            continue  # transformers drops what it cannot map (rope_freqs.weight, for one)
        entries.append(Entry(t, name, tuple(int(d) for d in reversed(t.shape))))  # GGUF lists dims fastest first
    return entries


class _TopLevel:
    """What `get_gguf_hf_weights_map` reads of a model, without its submodules: its recursion into every
    child module rebuilds gguf's name table each time (seconds), and for the Llama family the top level
    already names every parameter."""

    def __init__(self, model):
        self.config, self._names = model.config, dict.fromkeys(model.state_dict())

    def state_dict(self):
        return self._names

    def named_children(self):
        return []


def hf_name_map(config: PretrainedConfig, processor: TensorProcessor) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, by transformers' own mapping."""
    with torch.device("meta"):  # parameter names only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config)
    return get_gguf_hf_weights_map(_TopLevel(model), processor)


def read_tensor(reader: GGUFReader, e: Entry, processor: TensorProcessor) -> torch.Tensor:
    """One tensor in bfloat16, in Hugging Face's layout, dequantised a chunk of rows at a time."""
    data = e.source.data
    rows = data.reshape(-1, data.shape[-1])  # [R, values or quantised bytes per row]
    out = torch.empty(rows.shape[0], e.shape[-1], dtype=torch.bfloat16)  # [R, C]
    step = max(1, CHUNK_VALUES // e.shape[-1])
    for a in range(0, rows.shape[0], step):
        chunk = dequantize(rows[a : a + step], e.source.tensor_type)  # fp32 [step, C]
        if not chunk.flags.writeable:  # a view of the read-only map (F32 tensors): torch wants its own
            chunk = chunk.copy()
        out[a : a + step] = torch.from_numpy(chunk)
    forget_pages(reader, e.source)
    # The row reordering transformers applies (it does so in fp32; a permutation commutes with rounding).
    result = processor.process(weights=out.reshape(e.shape), name=e.source.name)
    assert result.name == e.source.name and tuple(result.weights.shape) == e.shape, e.source.name
    return result.weights.contiguous()


def forget_pages(reader: GGUFReader, t: ReaderTensor) -> None:
    """Drop a tensor's pages of the mapped file from this process (the page cache keeps them), so
    resident memory does not grow to the whole file as tensors are read."""
    mapped = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
    if mapped is None or not hasattr(mapped, "madvise"):
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)


def write_safetensors(path: Path, entries: list[Entry], read) -> None:
    """The header first (every shape is known), then each tensor's bytes as `read(entry)` returns them."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": "BF16", "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    assert sys.byteorder == "little", "safetensors data is little-endian"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for e in tqdm(entries, desc="llmd: tensors", unit="tensor", file=sys.stderr):
            t = read(e)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == e.shape and t.is_contiguous(), e.name
            f.write(t.view(torch.uint8).numpy().data)
        assert f.tell() == 8 + len(blob) + offset


def write_config(config: PretrainedConfig, out: Path) -> None:
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    d["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(d, indent=2))
