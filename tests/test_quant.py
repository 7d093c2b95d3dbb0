"""int8 and int4 weights: quantised per slice as they load, and sharding stays exact in structure.

A rank's quantised slice is that slice of the whole quantised tensor (int8 scales are whole rows'; int4
groups never straddle a shard boundary), so 1, 2 and 3 ranks, even or uneven, in one stage or two,
generate the same greedy tokens and logits within 1e-3 of one rank's (the ranks' float32 partial sums
are added in another order).
"""

import pytest
import torch

from conftest import llmd, llmd_here
from llmd.engine import quant
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.layers import Int4
from llmd.engine.memory import shard_weight_bytes
from llmd.engine.model import load_shard
from llmd.engine.plan import Plan, make_plan
from reference import teacher_forced_logits

CPU = torch.device("cpu")
DECODE_STEPS = 8
PROMPT = "The three primary colours of light are"


def effective(layer, inputs: int) -> torch.Tensor:
    """The weights a linear layer multiplies by, [out, in], read back through its own kernel."""
    with torch.inference_mode():
        return layer(torch.eye(inputs)[None]).float()[0].T


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_ranks_slice_is_that_slice_of_the_whole_quantised_tensor(int4_model, weights):
    cfg = ModelConfig.from_hf(load_hf_config(int4_model))
    unit = quant.column_unit(cfg, weights)
    whole = load_shard(int4_model, cfg, make_plan(cfg, [1], unit), 0, torch.float32, CPU, weights=weights)
    plan = make_plan(cfg, [3, 1], unit)
    D, H = cfg.head_dim, cfg.hidden_size
    for rank, shard in enumerate(plan.ranks):
        part = load_shard(int4_model, cfg, plan, rank, torch.float32, CPU, weights=weights)
        assert part.nbytes() == shard_weight_bytes(cfg, plan, rank, weights)
        q_rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in shard.q_heads])
        a, b = shard.mlp_columns
        assert a % unit == 0 and b % unit == 0
        for mine, full in zip(part.layers, whole.layers, strict=True):
            # Row splits (q) and column splits (o, down: int8 scales of whole rows, int4 groups inside a shard).
            assert torch.equal(effective(mine.q, H), effective(full.q, H)[q_rows])
            assert torch.equal(effective(mine.o, len(q_rows)), effective(full.o, H)[:, q_rows])
            assert torch.equal(effective(mine.down, b - a), effective(full.down, cfg.intermediate_size)[:, a:b])
        v0, v1 = shard.vocab_rows
        assert torch.equal(effective(part.lm_head, H), effective(whole.lm_head, H)[v0:v1])


def generate(model_dir, tmp_path, weights: str, *extra: str, compiled: bool = False) -> tuple[dict, dict]:
    """Eager in this process, or with the compiled decode step through the real command (as in
    test_engine_exact.py)."""
    dump = tmp_path / f"{weights}-{'-'.join(extra) or 'one'}-{compiled}.pt"
    args = ["generate", "--model", str(model_dir), "--weights", weights, "--greedy", "--ignore-eos",
            "--max-new-tokens", str(DECODE_STEPS + 1), "--json", "--dump-logits", str(dump), *extra, PROMPT]
    out = llmd(*args, "--compile", "on").json if compiled else llmd_here(*args, "--compile", "off").json
    return out, torch.load(dump)


def assert_agree(logits: dict, one_logits: dict, what) -> None:
    for phase in ("prefill", "decode"):
        err = (logits[phase] - one_logits[phase]).abs().max().item()
        scale = one_logits[phase].abs().max().item()
        assert err < 1e-3, f"{what}: {phase} logits differ from one rank's by {err} (largest {scale:.2f})"


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_one_two_and_three_ranks_agree(int4_model, tmp_path, weights):
    one, one_logits = generate(int4_model, tmp_path, weights)
    cfg = ModelConfig.from_hf(load_hf_config(int4_model))
    for extra in (["--workers", "2"], ["--workers", "3", "--shares", "2,3,1"], ["--workers", "2", "--stages", "2"]):
        out, logits = generate(int4_model, tmp_path, weights, *extra)
        assert out["token_ids"] == one["token_ids"], extra
        assert_agree(logits, one_logits, extra)
        plan = Plan.from_dict(out["plan"])
        for rank, mb in enumerate(out["weights_mb_per_rank"]):
            assert mb == pytest.approx(shard_weight_bytes(cfg, plan, rank, weights) / 2**20, abs=0.1)
    # Quantised, not broken: close to the fp32 model's own logits on the same tokens.
    ref = teacher_forced_logits(int4_model, one["prompt_token_ids"] + one["token_ids"])
    n = len(one["prompt_token_ids"])
    err = (one_logits["prefill"] - ref[:n]).abs().max().item()
    bound = {"int8": 0.02, "int4": 0.2}[weights] * ref.abs().max().item()
    assert err < bound, f"{weights} prefill logits are {err} off fp32's (bound {bound})"


def test_the_compiled_decode_step_on_two_uneven_ranks_agrees_with_one_eager_rank(int4_model, tmp_path):
    """int4 compiled: torch's kernel (on CPUs with bfloat16 instructions) or the dequantising multiply-sum
    for the layers split by their outputs, the multiply-sum for o_proj and down_proj, int8's for the LM head."""
    one, one_logits = generate(int4_model, tmp_path, "int4")
    out, logits = generate(int4_model, tmp_path, "int4", "--workers", "2", "--shares", "1,3", compiled=True)
    assert out["token_ids"] == one["token_ids"]
    assert_agree(logits, one_logits, "compiled, 2 ranks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch's int4 CUDA kernel")
def test_the_cuda_int4_kernel_multiplies_by_the_quantised_weights():
    """tinygemm's layout (two values a byte, tiled inputs) read back through the kernel: the weights that
    quant.quantise_int4 made, and a product close to theirs (bfloat16 activations and outputs)."""
    torch.manual_seed(0)
    w = torch.randn(200, 576)  # rows padded to 208; inputs tiled by 4 x 16 + groups of 32
    q, scales, zeros = quant.quantise_int4(w, 32)
    want = quant.dequantise_int4(quant.pack_nibbles(q, 32), scales, zeros, torch.float32)  # [200, 576]
    layer = Int4.build(q.cuda(), scales.cuda(), zeros.cuda(), 32, "cuda-bf16")
    read_back = layer.dequantised(torch.float32)[:200].cpu()
    assert (read_back - want).abs().max().item() < 2**-6 * want.abs().max().item()  # a few bfloat16 steps
    x = torch.randn(1, 3, 576)
    got = layer(x.cuda().bfloat16()).float().cpu()  # [1, 3, 200]
    assert (got - x @ want.T).abs().max().item() < 0.02 * (x @ want.T).abs().max().item()


def test_int4_refuses_a_model_its_groups_do_not_divide(tiny_models):
    out = llmd_here("generate", "--model", str(tiny_models["llama-gqa"]), "--weights", "int4", "hello")
    assert out.returncode != 0 and "int4 weights need" in out.stderr


def test_int4_ranks_load_from_many_files_within_their_slice_plus_one_tensor(default_model_dir, tmp_path):
    """A rank never holds the full-precision model, nor its own full-precision shard: its peak memory
    is its int4 slice, at most the largest single fp32 tensor read at once, and a fixed overhead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="150MB")
    tokenizer.save_pretrained(tmp_path)
    largest_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20  # the embedding: 192 MiB
    del model
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    out = llmd("generate", "--model", str(tmp_path), "--weights", "int4", "--workers", "2", "--greedy",
               "--max-new-tokens", "2", "--compile", "off", "--json", "hello").json
    for rank, (peak, before, weights) in enumerate(zip(out["loaded_peak_rss_mb_per_rank"],
                                                       out["rss_before_load_mb_per_rank"],
                                                       out["weights_mb_per_rank"], strict=True)):
        grew = peak - before  # what loading added to the process (torch and transformers were imported before)
        assert grew < weights + largest_mb + FIXED_OVERHEAD_MB, \
            f"rank {rank}: loading took {grew:.0f} MiB; its int4 slice is {weights:.0f}, the largest tensor {largest_mb:.0f}"


# What loading adds besides the slice: the config, the allocator's slack from quantising one tensor after
# another, transient buffers (measured here: a worker's loading added 285 MiB for a 130 MiB slice).
FIXED_OVERHEAD_MB = 100
