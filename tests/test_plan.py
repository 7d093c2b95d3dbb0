"""The head-shard plan: who holds which heads, MLP columns and vocabulary rows.

Pure functions of a ModelConfig and the shares, so no model files or processes are needed.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmd.engine.config import ModelConfig
from llmd.engine.errors import BadPlan
from llmd.engine.plan import Plan, apportion, make_plan, parse_shares


def model_config(num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152) -> ModelConfig:
    """Defaults are the bundled SmolLM2-135M-Instruct's shape."""
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=576, intermediate_size=intermediate_size,
        num_layers=30, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64, rms_norm_eps=1e-5,
        max_positions=8192, qkv_bias=False, o_bias=False, mlp_bias=False, tie_word_embeddings=True,
        sliding_window=None,
    )


SMOL = model_config()


def assert_partitions(ranges, total):
    """[start, end) ranges, in rank order, cover 0..total once each, none empty."""
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c
    assert all(b > a for a, b in ranges)


def assert_valid(plan: Plan, cfg: ModelConfig):
    """The invariants every plan must keep, whatever the shares."""
    q_owned = sorted(q for r in plan.ranks for q in r.q_heads)
    assert q_owned == list(range(cfg.num_heads)), "every query head owned exactly once"
    for r in plan.ranks:
        assert r.q_heads, f"rank {r.rank} has no query heads"
        # A rank keeps exactly the KV heads its query heads read, no more.
        assert r.kv_heads == sorted({q // cfg.group_size for q in r.q_heads})
    assert plan.kv_replicated == (plan.world_size > cfg.num_kv_heads)
    if not plan.kv_replicated:  # whole KV groups: no KV head on two ranks
        kv_owned = sorted(h for r in plan.ranks for h in r.kv_heads)
        assert kv_owned == list(range(cfg.num_kv_heads))
    assert_partitions([r.mlp_columns for r in plan.ranks], cfg.intermediate_size)
    assert_partitions([r.vocab_rows for r in plan.ranks], cfg.vocab_size)
    assert [r.rank for r in plan.ranks] == list(range(plan.world_size))


# apportion


def test_apportion_splits_in_proportion():
    assert apportion(1536, [2, 1]) == [1024, 512]
    assert apportion(3, [2, 1]) == [2, 1]
    assert apportion(49152, [1, 1, 1]) == [16384] * 3


def test_apportion_gives_everyone_at_least_one():
    assert apportion(3, [1000, 1, 1]) == [1, 1, 1]
    assert apportion(5, [1000, 1]) == [4, 1]


def test_apportion_breaks_ties_by_rank_and_is_deterministic():
    # One spare unit, equal remainders: the lowest rank gets it, every time.
    assert apportion(4, [1, 1, 1]) == [2, 1, 1]
    assert apportion(97, [0.3, 1.7, 2.2]) == apportion(97, [0.3, 1.7, 2.2])


def test_apportion_refuses_fewer_units_than_ranks():
    with pytest.raises(BadPlan):
        apportion(2, [1, 1, 1])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=12), st.integers(0, 5000))
def test_apportion_properties(shares, extra):
    total = len(shares) + extra
    counts = apportion(total, shares)
    assert sum(counts) == total
    assert min(counts) >= 1
    # Largest remainder: each count is within one unit of its exact quota (after the guaranteed one).
    for c, s in zip(counts, shares):
        assert abs((c - 1) - extra * s / sum(shares)) < 1
    assert apportion(total, shares) == counts


# parse_shares


def test_parse_shares_reads_numbers_and_defaults_to_even():
    assert parse_shares("2,1", 2) == [2.0, 1.0]
    assert parse_shares("0.5, 1.5 ,1", 3) == [0.5, 1.5, 1.0]
    assert parse_shares(None, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("text,workers,phrase", [
    ("1,1,1", 2, "3 values but there are 2 workers"),
    ("1", 2, "1 values but there are 2 workers"),
    ("a,b", 2, "numbers separated by commas"),
    ("1,,2", 3, "numbers separated by commas"),
    ("0,1", 2, "positive"),
    ("-1,2", 2, "positive"),
    ("nan,1", 2, "positive"),
])
def test_parse_shares_errors(text, workers, phrase):
    with pytest.raises(BadPlan, match=phrase):
        parse_shares(text, workers)


# make_plan on the bundled model's shape


def test_shares_2_1_give_rank_0_two_kv_groups():
    plan = make_plan(SMOL, [2, 1])
    assert_valid(plan, SMOL)
    r0, r1 = plan.ranks
    assert (r0.kv_heads, r0.q_heads) == ([0, 1], [0, 1, 2, 3, 4, 5])
    assert (r1.kv_heads, r1.q_heads) == ([2], [6, 7, 8])
    assert (r0.mlp_columns, r1.mlp_columns) == ((0, 1024), (1024, 1536))
    assert (r0.vocab_rows, r1.vocab_rows) == ((0, 32768), (32768, 49152))
    assert not plan.kv_replicated


def test_more_ranks_than_kv_heads_replicates_kv():
    plan = make_plan(SMOL, [1, 1, 1, 1])
    assert_valid(plan, SMOL)
    assert plan.kv_replicated
    assert [r.q_heads for r in plan.ranks] == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    # Rank 2's query heads straddle two KV groups, so it keeps a replica of both.
    assert [r.kv_heads for r in plan.ranks] == [[0], [1], [1, 2], [2]]


def test_one_rank_holds_everything():
    plan = make_plan(SMOL, [1])
    assert_valid(plan, SMOL)
    (r,) = plan.ranks
    assert (r.kv_heads, r.q_heads) == ([0, 1, 2], list(range(9)))


def test_more_ranks_than_query_heads_is_refused():
    with pytest.raises(BadPlan, match="only 9 query heads"):
        make_plan(SMOL, [1.0] * 10)
    assert_valid(make_plan(SMOL, [1.0] * 9), SMOL)  # one head each is still fine


def test_plan_json_round_trip():
    for shares in ([2, 1], [1, 1, 1, 1], [1.0] * 9):
        plan = make_plan(SMOL, [float(s) for s in shares])
        assert Plan.from_json(plan.to_json()) == plan


# Any shape, any shares


@st.composite
def shapes_and_shares(draw):
    num_kv = draw(st.integers(1, 8))
    num_heads = num_kv * draw(st.integers(1, 6))
    workers = draw(st.integers(1, num_heads))
    cfg = model_config(num_heads=num_heads, num_kv_heads=num_kv,
                       intermediate_size=draw(st.integers(workers, 5000)),
                       vocab_size=draw(st.integers(workers, 200_000)))
    shares = draw(st.lists(st.floats(0.05, 20), min_size=workers, max_size=workers))
    return cfg, shares


@settings(max_examples=300, deadline=None)
@given(shapes_and_shares())
def test_any_plan_is_valid_and_round_trips(case):
    cfg, shares = case
    plan = make_plan(cfg, shares)
    assert_valid(plan, cfg)
    assert Plan.from_json(plan.to_json()) == plan
    assert make_plan(cfg, shares) == plan  # deterministic



def test_pipeline_plan_covers_every_layer_once_and_shards_each_stage():
    from llmd.engine.plan import Plan, make_pipeline_plan

    cfg = SMOL
    plan = make_pipeline_plan(cfg, [1.0, 1.0, 2.0], 2)
    assert [s.ranks for s in plan.stages] == [[0, 1], [2]]
    layers = [i for s in plan.stages for i in range(*s.layers)]
    assert layers == list(range(cfg.num_layers))
    assert plan.stages[0].layers == (0, 15)  # both stages have a total share of 2
    for index, stage in enumerate(plan.stages):
        heads = sorted(q for r in stage.ranks for q in plan.ranks[r].q_heads)
        assert heads == list(range(cfg.num_heads))
        assert all(plan.ranks[r].stage == index for r in stage.ranks)
    assert Plan.from_json(plan.to_json()) == plan


def test_pipeline_plan_refuses_more_stages_than_workers():
    from llmd.engine.plan import make_pipeline_plan

    with pytest.raises(BadPlan, match="--stages"):
        make_pipeline_plan(SMOL, [1.0, 1.0], 3)
