"""The head-shard engine computes what the unsharded transformers model computes.

Each case runs the CLI's `generate` (driver + worker processes over gloo) with --dump-logits,
then compares prefill logits, 32 decode steps of logits and the greedy tokens with transformers
itself, in fp32 on CPU, and checks that every rank holds exactly the weights the plan gives it.
Most cases run the CLI's code in this process with the eager decode step (`llmd_here`); the
compiled decode step, which `--compile auto` picks on CPU, runs through the real `llmd` command
on one case: two ranks with uneven shares (compiling the two stages of a pipeline costs more).
"""

import json

import pytest
import torch

from conftest import llmd, llmd_here
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.memory import shard_weight_bytes
from llmd.engine.plan import Plan
from reference import hf_greedy, teacher_forced_logits

TOLERANCE = 1e-3  # fp32 summation order alone moves the bundled model's logits by ~1e-4
DECODE_STEPS = 32
PROMPT = "The three primary colours of light are"
MIB = 2**20


def run_and_compare(model_dir, tmp_path, workers: int | None, shares: str | None, *extra: str,
                    compiled: bool = False):
    dump = tmp_path / "logits.pt"
    args = ["generate", "--model", str(model_dir), "--greedy", "--ignore-eos",
            "--max-new-tokens", str(DECODE_STEPS + 1), "--weights", "fp32", "--json", "--dump-logits", str(dump), *extra, PROMPT]
    if workers:
        args[3:3] = ["--workers", str(workers)]
    if shares:
        args[3:3] = ["--shares", shares]
    out = llmd(*args, "--compile", "on").json if compiled else llmd_here(*args, "--compile", "off").json
    got = torch.load(dump)
    prompt, generated = out["prompt_token_ids"], out["token_ids"]
    assert len(generated) == DECODE_STEPS + 1
    assert got["decode"].shape[0] == DECODE_STEPS

    ref = teacher_forced_logits(model_dir, prompt + generated)  # [S, V]
    n = len(prompt)
    prefill_err = (got["prefill"] - ref[:n]).abs().max().item()
    decode_err = (got["decode"] - ref[n : n + DECODE_STEPS]).abs().max().item()
    assert prefill_err < TOLERANCE, f"prefill logits differ by {prefill_err}"
    assert decode_err < TOLERANCE, f"decode logits differ by {decode_err}"
    # Greedy: every generated token is the reference's argmax given the same prefix.
    assert ref[n - 1 : n + DECODE_STEPS].argmax(-1).tolist() == generated
    assert_holds_its_slice_only(model_dir, out)
    return out


def assert_holds_its_slice_only(model_dir, out: dict):
    """Each rank's resident weights are what the plan's memory arithmetic says (test_resident_weights.py
    checks that arithmetic against the model's shape), never the whole model."""
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    plan = Plan.from_dict(out["plan"])
    for rank, mb in enumerate(out["weights_mb_per_rank"]):
        assert mb == pytest.approx(shard_weight_bytes(cfg, plan, rank) / MIB, abs=0.1), f"rank {rank}"


@pytest.mark.parametrize("workers,shares,compiled", [(1, None, False), (2, None, False), (2, "2,1", True),
                                                     (3, None, False), (3, "1,2,1", False)])
def test_bundled_model_matches_transformers(default_model_dir, tmp_path, workers, shares, compiled):
    out = run_and_compare(default_model_dir, tmp_path, workers, shares, compiled=compiled)
    assert len(out["plan"]["ranks"]) == workers


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias", "mistral-2kv"])
@pytest.mark.parametrize("workers,shares", [(2, "3,1"), (3, "2,3,1")])
def test_tiny_models_match_transformers(tiny_models, tmp_path, kind, workers, shares):
    out = run_and_compare(tiny_models[kind], tmp_path, workers, shares)
    if kind == "mistral-2kv" and workers == 3:
        assert out["plan"]["kv_replicated"]


@pytest.mark.parametrize("workers,stages,shares,compiled", [(2, 2, None, False), (3, 2, "2,1,1", False),
                                                            (3, 3, None, False)])
def test_pipeline_stages_match_transformers(default_model_dir, tmp_path, workers, stages, shares, compiled):
    out = run_and_compare(default_model_dir, tmp_path, workers, shares, "--stages", str(stages), compiled=compiled)
    assert len(out["plan"]["stages"]) == stages


def test_pipeline_with_head_shard_inside_a_stage_on_a_tiny_model(tiny_models, tmp_path):
    out = run_and_compare(tiny_models["qwen2-bias"], tmp_path, 3, "1,1,2", "--stages", "2")
    assert [st["ranks"] for st in out["plan"]["stages"]] == [[0, 1], [2]]


def test_a_plan_file_from_the_planner_runs_and_matches_transformers(default_model_dir, tmp_path):
    """Two hosts, the first with two devices: the planner makes 2 stages, head-shard inside the first."""
    devices = ["--device", "ws1:cpu", "--device", "ws1:cpu", "--device", "ws2:cpu"]
    planned = llmd_here("plan", "--model", "default", *devices, "--weights", "fp32", "--context", "2048",
                        "--json").json
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(planned))
    out = run_and_compare(default_model_dir, tmp_path, None, None, "--plan", str(path))
    assert [st["ranks"] for st in out["plan"]["stages"]] == [s["ranks"] for s in planned["stages"]] == [[0, 1], [2]]
    assert [st["layers"] for st in out["plan"]["stages"]] == [s["layers"] for s in planned["stages"]]


def test_chat_greedy_tokens_equal_hf_generate(default_model_dir):
    out = llmd_here("generate", "--workers", "2", "--shares", "2,1", "--greedy", "--chat", "--max-new-tokens", "24",
                    "--compile", "off", "--weights", "fp32", "--json", "What is the capital of France?").json
    assert out["token_ids"] == hf_greedy(default_model_dir, out["prompt_token_ids"], 24)
    assert "Paris" in out["text"]
