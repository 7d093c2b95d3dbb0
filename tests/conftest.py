"""Shared fixtures: the bundled model, tiny random models, and running the real `llmd` CLI."""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from llmd.engine.checkpoint import resolve_model

CLI = [sys.executable, "-m", "llmd"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        assert self.returncode == 0, self.stderr
        return json.loads(self.stdout.strip().splitlines()[-1])


def llmd(*args: str, timeout: float = 300) -> Run:
    """Run the real CLI in a child process."""
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout, p.stderr)


def llmd_here(*args: str) -> Run:
    """Run the real CLI's code in this process (its workers are still processes of their own): what
    `llmd` does, without starting an interpreter and importing torch once more."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        from llmd.__main__ import main

        code = main(list(args))
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _environment_restored():
    """A test that sets variables in this process (a cluster run here sets gloo's interface) leaves
    none behind for the next one."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def _no_process_outlives_its_module():
    yield
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=15)  # stopping ones may take a moment
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(" ".join(p.cmdline()[:5]))
            p.kill()
    assert not names, f"left running after the module's tests: {names}"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model("default")


TINY_CONFIGS = {
    # GQA Llama 3.1 with "llama3" rope scaling and untied embeddings.
    "llama-gqa": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    # Qwen2: biases on q/k/v, tied embeddings.
    "qwen2-bias": dict(model_type="qwen2", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    # Fewer KV heads than the 3 ranks tested: KV heads are replicated, query heads split.
    "mistral-2kv": dict(model_type="mistral", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
}


def make_tiny_model(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64,
        intermediate_size=160, num_hidden_layers=3, max_position_embeddings=512, rms_norm_eps=1e-6,
        head_dim=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **spec,
    )
    torch.manual_seed(hash(kind) % 1000)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so a wrong bias shard would show
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(kind, root / kind, default_model_dir) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def int4_model(tmp_path_factory, default_model_dir):
    """A tiny Llama whose sizes int4 groups divide: head 32, hidden 128, MLP 256 (8 groups of 32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = tmp_path_factory.mktemp("int4-model")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
