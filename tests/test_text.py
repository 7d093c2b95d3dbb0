"""Text deltas token by token: what the stream shows adds up to what decoding the whole reply gives."""

import random

import pytest

from llmd.app.pool import fit_history
from llmd.app.text import Detokenizer, TextModel
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.memory import MAX_DEFAULT_SLOTS, default_slots, kv_cache_bytes, shard_weight_bytes
from llmd.engine.plan import make_plan

MIXED = "Héllo wörld — 日本語のテキスト 🙂🚀 naïve café\n  two  spaces\tand tabs, ünïcödé. " * 3


@pytest.fixture(scope="module")
def text(default_model_dir) -> TextModel:
    return TextModel.load(default_model_dir)


@pytest.mark.parametrize("seed", range(8))
def test_deltas_add_up_to_the_whole_decoded_reply(text, seed):
    rng = random.Random(seed)
    ids = text.tokenizer(MIXED)["input_ids"] if seed == 0 else \
        [rng.randrange(text.tokenizer.vocab_size) for _ in range(300)]
    detok = text.detokenizer()
    deltas = [detok.add(t) for t in ids]
    whole = text.decode(ids)
    assert "".join(deltas) == whole or (whole.startswith("".join(deltas)) and whole.endswith("\ufffd"))
    assert not any(d.endswith("\ufffd") for d in deltas)  # never half a character


def test_a_long_reply_decodes_in_linear_time():
    calls = []

    def decode(ids: list[int]) -> str:
        calls.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)

    detok = Detokenizer(decode)
    for t in range(2000):
        detok.add(t)
    assert max(calls) <= 2 and sum(calls) < 5 * 2000  # windows of a token or two, never the whole reply


def test_a_chat_too_long_for_the_context_leaves_out_its_oldest_turns(text):
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"message {i} " + "word " * 40} for i, r in
             enumerate(["user", "assistant"] * 4 + ["user"])]
    ids, dropped = fit_history(text, [system, *turns], context=256, max_new_tokens=64)
    assert dropped > 0 and dropped % 2 == 0  # whole turns: a user message with its reply
    assert len(ids) + 64 <= 256
    kept = text.tokenizer.decode(ids)
    assert "Be brief." in kept and "message 8" in kept and "message 0" not in kept
    whole, none = fit_history(text, [system, *turns[-1:]], context=256, max_new_tokens=64)
    assert none == 0 and whole == text.chat_ids([system, *turns[-1:]])


def test_default_slots_fill_half_the_free_memory_beside_the_weights(default_model_dir):
    cfg = ModelConfig.from_hf(load_hf_config(default_model_dir))
    plan = make_plan(cfg, [1.0, 1.0])
    weights = max(shard_weight_bytes(cfg, plan, r, "fp32", 4) for r in range(2))
    per_slot = max(kv_cache_bytes(cfg, plan, r, 2048, 1, 4) for r in range(2))
    assert default_slots(cfg, plan, 2048, "fp32", 4, [10 * 2**30] * 2) == MAX_DEFAULT_SLOTS
    three = 2 * (weights + 3 * per_slot) + 1000
    assert default_slots(cfg, plan, 2048, "fp32", 4, [three, 10 * 2**30]) == 3
    assert default_slots(cfg, plan, 2048, "fp32", 4, [weights, weights]) == 1  # never fewer than one
