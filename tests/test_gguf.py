"""GGUF files are converted a tensor at a time: memory stays near one tensor, the weights are the ones
transformers loads from the same file in bfloat16, and two ranks generate transformers' greedy tokens.

The GGUF files are written here with gguf-py's `GGUFWriter`, the way llama.cpp's convert_hf_to_gguf.py
writes a Llama (Q/K rows permuted, 2-D weights quantised, norms in F32), from a random model and the
first 512 tokens of the bundled model's vocabulary (a small vocabulary keeps the metadata, and so the
fixed cost of reading it, small).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import llmd_here
from llmd.engine.checkpoint import convert_gguf

MIB = 2**20
VOCAB = 512  # of SmolLM2's: 17 special tokens, the 256 byte-level ones, then merged ones
SPECIAL_TOKENS = 17
# Converting holds one tensor's bfloat16 copy (half its fp32 size) and the fp32 rows being dequantised
# (engine/gguf.py's 4 MiB chunk, held twice inside gguf-py): under 2x the largest tensor in fp32 here.
# On top of it a fixed part, measured at ~25 MiB on this model: ~8 MiB for the meta-device model and
# the parsed config, ~16 MiB of library code paged in on the first use of the dequantising and
# rounding kernels. Stated with headroom:
FIXED_OVERHEAD_MIB = 48
# Wide MLPs make a model of many large-ish tensors: 12 of 8 MiB in fp32 (100 MiB in all), so the bound
# (2 x 8 + 48 = 64 MiB) fails if the conversion ever holds the whole model, in fp32 or in bfloat16.
BIG = dict(intermediate_size=32768, num_hidden_layers=4, tie_word_embeddings=False)
PROMPT = "The three primary colours of light are"

TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}

# Converts in a fresh interpreter and reports its peak resident memory above the RSS once imports are
# done. Not ru_maxrss: Linux carries it over from the process this one was started from (pytest, with
# torch loaded), so the peak is the kernel's high-water mark of this process's own memory (VmHWM),
# reset to the current RSS after the imports.
MEASURE = r"""
import json, re, sys
from pathlib import Path
import torch, transformers, gguf, tokenizers, safetensors, tqdm
import transformers.models.llama.modeling_llama, transformers.generation
import llmd.engine.gguf
from llmd.engine.checkpoint import converted_gguf

def status_kib(field):
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text())[1])

Path("/proc/self/clear_refs").write_text("5")  # the high-water mark := the RSS now
base = status_kib("VmRSS")
out = converted_gguf(Path(sys.argv[1]))
print(json.dumps({"dir": str(out), "grew": (status_kib("VmHWM") - base) * 1024}))
"""


def small_vocab(tokenizer_dir: Path) -> tuple[list[str], list[str]]:
    """The first VOCAB tokens of a byte-level BPE vocabulary and the merges that stay inside them."""
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)[:VOCAB]
    kept = set(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, [m for m in merges if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]


def tiny_llama(seed: int, **shape):
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, **({"intermediate_size": 128, "num_hidden_layers": 2} | shape),
    )  # head_dim 32 and every row a multiple of 32: whole Q8_0/Q4_0 blocks
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{module}.weight
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, tokens: list[str], merges: list[str], qtype: GGMLQuantizationType) -> Path:
    c = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < SPECIAL_TOKENS else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        a = t.numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if a.ndim == 1:
            w.add_tensor(gguf_name(name), a)  # norms stay F32
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def vocab(default_model_dir):
    return small_vocab(default_model_dir)


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory, vocab) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "big.gguf", tiny_llama(1, **BIG), *vocab,
                            GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def hf_from_gguf(path: Path):
    """transformers' own reading of the file, in bfloat16 (the weights a conversion writes)."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)


def hf_reference(path: Path):
    """transformers' bfloat16 weights of the file, computed in fp32 as the engine computes. (`.float()`
    is refused on a model loaded from a GGUF, so the weights move to an fp32 model of the same config.)"""
    bf16 = hf_from_gguf(path)
    fp32 = AutoModelForCausalLM.from_config(bf16.config, dtype=torch.float32)
    fp32.load_state_dict({name: t.float() for name, t in bf16.state_dict().items()})
    return fp32.eval()


def test_converting_holds_one_tensor_not_the_model(big_gguf, cache_dir):
    env = {**os.environ, "LLMD_CACHE_DIR": str(cache_dir)}
    p = subprocess.run([sys.executable, "-c", MEASURE, str(big_gguf)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    measured = json.loads(p.stdout.strip().splitlines()[-1])
    tensors = load_file(Path(measured["dir"]) / "model.safetensors")
    largest_fp32 = max(t.numel() for t in tensors.values()) * 4
    whole_fp32 = sum(t.numel() for t in tensors.values()) * 4
    bound = 2 * largest_fp32 + FIXED_OVERHEAD_MIB * MIB
    assert bound < whole_fp32 * 0.7, "the model is too small for the bound to tell one tensor from all"
    assert measured["grew"] < bound, f"grew {measured['grew'] / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB"


@pytest.mark.parametrize("qtype,tied", [(GGMLQuantizationType.Q8_0, False), (GGMLQuantizationType.Q4_0, True)],
                         ids=["Q8_0-untied", "Q4_0-tied"])
def test_converted_weights_are_what_transformers_loads_in_bfloat16(tmp_path, vocab, qtype, tied):
    path = write_llama_gguf(tmp_path / "small.gguf", tiny_llama(2, tie_word_embeddings=tied), *vocab, qtype)
    out = tmp_path / "converted"
    out.mkdir()
    convert_gguf(path, out)
    ours = load_file(out / "model.safetensors")
    theirs = hf_from_gguf(path).state_dict()
    assert ("lm_head.weight" in ours) == (not tied)
    assert set(ours) <= set(theirs) and set(theirs) - set(ours) <= {"lm_head.weight"}
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, theirs[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert config["tie_word_embeddings"] == tied
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()


@torch.inference_mode()
def test_two_ranks_generate_transformers_greedy_tokens_from_a_gguf(big_gguf, cache_dir, monkeypatch):
    monkeypatch.setenv("LLMD_CACHE_DIR", str(cache_dir))  # the conversion above, if it ran, is reused
    steps = 16
    out = llmd_here("generate", "--model", str(big_gguf), "--workers", "2", "--greedy", "--ignore-eos",
                    "--max-new-tokens", str(steps), "--compile", "off", "--weights", "fp32", "--json", PROMPT).json
    prompt, generated = out["prompt_token_ids"], out["token_ids"]
    assert len(generated) == steps
    # transformers' bfloat16 weights computed in fp32, as the engine does: each generated token is its
    # argmax given the same prefix.
    logits = hf_reference(big_gguf)(torch.tensor([prompt + generated])).logits[0]  # [S, V]
    n = len(prompt)
    assert logits[n - 1 : n - 1 + steps].argmax(-1).tolist() == generated
