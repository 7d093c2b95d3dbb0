"""Live migrations in the real engine (driver + worker processes, gloo), exact against transformers.

The mechanism is driven at chosen steps: the test asks the driver to `prepare` a move (every rank
builds its new shard and copies the KV prefix in the background), decodes a few more tokens, waits
until every rank is ready and `switch`es. Every step's logits are compared with the unsharded
transformers model, so a KV head or an MLP column lost or doubled in a move shows as a wrong logit
at the step after it. Which steps the moves fall on is the test's choice, never the machine's.

When the balancer decides is a policy, tested on synthetic step times in test_balancer_policy.py;
one end-to-end run here checks that a simulated slow rank (`--slowdown`) is relieved at all.
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
import torch
from transformers import AutoTokenizer

from llmd.app.launch import LocalCluster
from llmd.engine import quant
from llmd.engine.balancer import BalancerConfig, decide
from llmd.engine.config import ModelConfig, load_hf_config
from llmd.engine.plan import Plan, make_pipeline_plan, make_plan
from llmd.engine.sampling import SamplingParams
from llmd.engine.worker import RankSpec
from reference import teacher_forced_logits

TOLERANCE = 1e-3
PROMPT = "Once upon a time, in a small village by the sea,"
BC = BalancerConfig()
READY_S = 120  # how long a move may take to prepare on a loaded machine: a deadline, not a measurement


def move_off(plan: Plan, cfg: ModelConfig, slow: int, stage: int = 0, bc: BalancerConfig = BC) -> Plan:
    """The plan the balancer itself would move to with `slow` the slowest rank of its stage."""
    times = [200.0 if r == slow else 50.0 for r in range(plan.world_size)]
    move = decide(plan, cfg, times, bc, bc.patience, 100)
    assert move is not None and move.stage == stage and move.from_rank == slow
    return move.plan


@dataclass
class Forced:
    """A move prepared before decode step `at` and switched `after` steps later."""

    at: int
    plan: Plan
    after: int = 3
    fails: bool = False  # the move must fail, and is aborted
    before: Callable[[], None] = lambda: None  # what the test does first


@dataclass
class Run:
    ids: list[int]  # prompt + generated
    prompt_len: int
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] for every generated token
    plans: list[Plan] = field(default_factory=list)  # the plan in force after each move


def wait_until_prepared(driver) -> int:
    """Every rank's migration status once none is still preparing: 1 ready, 2 failed."""
    deadline = time.monotonic() + READY_S
    while True:
        states = [t.migration for t in driver.times(reset_sent=False)]
        if 0 not in states:
            return max(states)
        assert time.monotonic() < deadline, f"a move was still preparing after {READY_S} s: {states}"
        time.sleep(0.05)


def decode_with_moves(model_dir, plan: Plan, moves: list[Forced], tokens: int, weights: str = "fp32") -> Run:
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    spec = RankSpec(model_dir=str(model_dir), plan=plan.to_dict(), rank=0, context=128, reshardable=True,
                    weights=weights)
    run = Run(list(ids), len(ids))
    with LocalCluster(spec, plan.world_size) as cluster:
        driver = cluster.driver
        logits = driver.forward([ids], [0], [0])[0].cpu()
        due = {m.at: m for m in moves}
        switch_at: dict[int, Forced] = {}
        for step in range(tokens):
            run.logits.append(logits)
            run.ids.append(int(logits.argmax()))
            if step in due:
                move = due[step]
                move.before()
                driver.prepare(move.plan)
                switch_at[step + move.after] = move
            if step in switch_at:
                move = switch_at.pop(step)
                status = wait_until_prepared(driver)
                if move.fails:
                    assert status == 2, "the move read a checkpoint that is gone, yet did not fail"
                    driver.abort()
                else:
                    assert status == 1
                    driver.switch()
                    assert driver.plan == move.plan
                run.plans.append(driver.plan)
            logits = driver.forward([[run.ids[-1]]], [0], [len(run.ids) - 1])[0].cpu()
    return run


def assert_exact(model_dir, run: Run):
    ref = teacher_forced_logits(model_dir, run.ids)[run.prompt_len - 1 : -1]  # [steps, V]
    got = torch.stack(run.logits)
    per_step = (got - ref).abs().amax(-1)  # [steps]
    worst = int(per_step.argmax())
    assert per_step.max().item() < TOLERANCE, f"step {worst} differs by {per_step.max().item()}"
    assert ref.argmax(-1).tolist() == run.ids[run.prompt_len :]  # the greedy tokens transformers picks


def test_two_moves_on_the_bundled_model_stay_exact(default_model_dir):
    """Rank 0 gives, then rank 1 gives back part of it (the balancer correcting an overshoot)."""
    cfg = ModelConfig.from_hf(load_hf_config(default_model_dir))
    plan = make_plan(cfg, [1.0, 1.0])
    first = move_off(plan, cfg, slow=0)
    second = move_off(first, cfg, slow=1)
    run = decode_with_moves(default_model_dir, plan, [Forced(6, first), Forced(16, second, after=1)], tokens=26)
    assert run.plans == [first, second]
    assert_exact(default_model_dir, run)


@pytest.mark.parametrize("kind,workers,stages,slow", [
    ("llama-gqa", 3, 2, 1),  # inside pipeline stage 0 (ranks 0, 1); stage 1 is untouched
    ("mistral-2kv", 3, 1, 2),  # 2 KV heads over 3 ranks: replicated KV heads, query heads move
    ("qwen2-bias", 2, 1, 1),  # q/k/v biases move with their heads
])
def test_moves_of_every_kind_stay_exact(tiny_models, kind, workers, stages, slow):
    model_dir = tiny_models[kind]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    plan = make_pipeline_plan(cfg, [1.0] * workers, stages)
    new = move_off(plan, cfg, slow)
    if stages > 1:
        assert new.ranks[2] == plan.ranks[2]
    if plan.kv_replicated:
        assert len(new.ranks[slow].q_heads) < len(plan.ranks[slow].q_heads)
    run = decode_with_moves(model_dir, plan, [Forced(4, new, after=5)], tokens=14)
    assert run.plans == [new]
    assert_exact(model_dir, run)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_slices_move_and_stay_exact(int4_model, weights):
    """A move of quantised weights (int4: MLP columns in whole groups) computes what one rank computes in
    the same precision, on every step before and after the switch."""
    cfg = ModelConfig.from_hf(load_hf_config(int4_model))
    unit = quant.column_unit(cfg, weights)
    plan = make_plan(cfg, [1.0, 1.0], unit)
    new = move_off(plan, cfg, slow=0, bc=replace(BC, column_unit=unit))
    assert all(c % unit == 0 for r in new.ranks for c in r.mlp_columns)
    run = decode_with_moves(int4_model, plan, [Forced(3, new, after=3)], tokens=10, weights=weights)
    assert run.plans == [new]
    one = decode_with_moves(int4_model, make_plan(cfg, [1.0], unit), [], tokens=10, weights=weights)
    assert run.ids == one.ids
    err = (torch.stack(run.logits) - torch.stack(one.logits)).abs().amax(-1)  # [steps]
    assert err.max().item() < TOLERANCE, f"step {int(err.argmax())} differs from one rank's by {err.max().item()}"


def test_a_failed_move_is_aborted_and_generation_goes_on(tiny_models, tmp_path):
    """A rank that cannot read the slices it gains fails its move; the driver aborts it, every rank
    keeps the old plan and decodes on, and a later move succeeds."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["llama-gqa"], model_dir)
    weights, aside = model_dir / "model.safetensors", tmp_path / "aside.safetensors"
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    plan = make_plan(cfg, [1.0, 1.0])
    new = move_off(plan, cfg, slow=0)
    moves = [Forced(3, new, fails=True, before=lambda: weights.rename(aside)),
             Forced(8, new, before=lambda: aside.rename(weights))]
    run = decode_with_moves(model_dir, plan, moves, tokens=14)
    assert run.plans == [plan, new]
    assert_exact(model_dir, run)


def test_a_slot_reused_while_a_move_is_prepared_holds_only_its_new_chat(tiny_models):
    """Chat A holds slot 0 when a move starts; A ends (its slot is cleared) and chat B takes the slot
    before the switch. After the switch B must read its own keys and values, none of A's."""
    model_dir = tiny_models["llama-gqa"]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    old = make_plan(cfg, [1, 1])
    new = replace(make_plan(cfg, [1, 3]), epoch=1)  # KV groups, columns and vocabulary rows change owner
    chat_a, chat_b = list(range(11, 31)), [5, 6, 7]
    with LocalCluster(RankSpec(model_dir=str(model_dir), plan=old.to_dict(), rank=0, context=64), 2) as cluster:
        driver = cluster.driver
        driver.forward([chat_a], [0], [0])
        driver.prepare(new)
        while any(t.migration == 0 for t in driver.times()):  # every rank has copied A's prefix
            time.sleep(0.05)
        driver.clear_slot(0)
        driver.forward([chat_b], [0], [0])
        driver.switch()
        assert driver.plan == new
        ids = list(chat_b)
        for token in (40, 41, 42):
            logits = driver.forward([[token]], [0], [len(ids)])[0].cpu()
            ids.append(token)
            assert (logits - teacher_forced_logits(model_dir, ids)[-1]).abs().max().item() < TOLERANCE


def test_a_move_with_several_sequences_in_flight_copies_every_live_slot(tiny_models):
    """Three chats of different lengths decode in one batch while a move is prepared and switched: every
    live slot's KV prefix (and the positions written meanwhile) follows the heads, so each chat's logits
    stay transformers' at every step, before and after the switch."""
    model_dir = tiny_models["llama-gqa"]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    old = make_plan(cfg, [1, 1])
    new = move_off(old, cfg, slow=1)
    chats = {0: list(range(11, 31)), 1: [5, 6, 7], 2: list(range(40, 49))}  # slot -> prompt
    spec = RankSpec(model_dir=str(model_dir), plan=old.to_dict(), rank=0, context=64, slots=3, reshardable=True)
    with LocalCluster(spec, 2) as cluster:
        driver = cluster.driver
        last = {}
        for slot, ids in chats.items():
            last[slot] = driver.forward([ids], [slot], [0])[0].cpu()
        for step in range(8):
            if step == 2:
                driver.prepare(new)
            if step == 5:
                assert wait_until_prepared(driver) == 1
                driver.switch()
                assert driver.plan == new
            for slot, ids in chats.items():
                ref = teacher_forced_logits(model_dir, ids)[-1]
                assert (last[slot] - ref).abs().max().item() < TOLERANCE, f"slot {slot}, step {step}"
                ids.append(int(last[slot].argmax()))
            slots = sorted(chats)
            logits = driver.forward([[chats[s][-1]] for s in slots], slots, [len(chats[s]) - 1 for s in slots])
            last = {s: logits[row].cpu() for row, s in enumerate(slots)}


@pytest.mark.slow
def test_a_slowed_rank_is_relieved_end_to_end(default_model_dir):
    """The whole loop: rank 0 three times slower from the start, the balancer on. What holds on any
    loaded machine: the first move is off rank 0, it finishes, and the tokens stay exact on both sides
    of it. Not when it moves: decoding goes on until it has (with a budget), then 8 tokens more."""
    ids = AutoTokenizer.from_pretrained(default_model_dir)(PROMPT)["input_ids"]
    cfg = ModelConfig.from_hf(load_hf_config(default_model_dir))
    spec = RankSpec(model_dir=str(default_model_dir), plan=make_plan(cfg, [1.0, 1.0]).to_dict(), rank=0,
                    context=1024, reshardable=True, slowdown=[[0, 3.0, 0]])
    with LocalCluster(spec, 2, balancer=BC) as cluster:
        driver = cluster.driver
        tokens, moved_at = [], []

        def after_a_move_and_8_more() -> bool:
            if driver.rebalancer.events and not moved_at:
                moved_at.append(len(tokens))
            return bool(moved_at) and len(tokens) >= moved_at[0] + 8

        gen = driver.generate(ids, SamplingParams(max_new_tokens=1024 - len(ids) - 1, greedy=True),
                              on_token=tokens.append, record_logits=True, should_stop=after_a_move_and_8_more)
    events = gen.migrations
    print(f"moves (step, switch step, status): {[(e['step'], e['switch_step'], e['status']) for e in events]}")
    assert events, f"no move finished in {len(gen.token_ids)} tokens off a rank three times slower"
    assert (events[0]["from_rank"], events[0]["to_rank"], events[0]["status"]) == (0, 1, "done")
    assert events[0]["bytes_moved"] > 0 and events[0]["kv_bytes"] > 0
    run = Run(ids + gen.token_ids, len(ids), [gen.prefill_logits[-1], *gen.decode_logits])
    assert_exact(default_model_dir, run)
