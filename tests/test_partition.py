"""The hierarchical partition planner: stages across hosts, head-shard inside, memory and speed.

Pure functions of shapes, devices and links, so no model files, processes or GPUs are needed.
"""

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmd.engine.config import ModelConfig
from llmd.engine.errors import BadPlan, LlmdError
from llmd.engine.partition import (
    Device, Partition, describe, layer_params, link_between, load_plan, parse_device, parse_link, plan_partition,
    stage_groups,
)
from llmd.engine.plan import Plan, check_plan
from llmd.engine.presets import DEVICE_KINDS, MOE, PRESETS, UnknownPreset, device_kind, preset

KINDS = sorted(DEVICE_KINDS)


def devices(spec: str, n: int) -> list[Device]:
    return [parse_device(spec)] * n


@st.composite
def model_shapes(draw) -> ModelConfig:
    kv = draw(st.integers(1, 6))
    heads = kv * draw(st.integers(1, 4))
    heads = max(heads, kv * -(-4 // kv))  # at least 4 query heads, so a host of 4 devices can head-shard
    return ModelConfig(
        model_type="llama", vocab_size=draw(st.integers(16, 512)), hidden_size=draw(st.sampled_from([32, 64, 96])),
        intermediate_size=draw(st.integers(8, 300)), num_layers=draw(st.integers(4, 24)), num_heads=heads,
        num_kv_heads=kv, head_dim=draw(st.sampled_from([8, 16])), rms_norm_eps=1e-5, max_positions=4096,
        qkv_bias=draw(st.booleans()), o_bias=False, mlp_bias=False, tie_word_embeddings=draw(st.booleans()),
        sliding_window=None,
    )


@st.composite
def clusters(draw) -> list[Device]:
    hosts = draw(st.integers(1, 4))
    return [
        parse_device(f"h{h}:{draw(st.sampled_from(KINDS))}")
        for h in range(hosts)
        for _ in range(draw(st.integers(1, 4)))
    ]


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(model_shapes(), clusters(), st.sampled_from(["fp32", "bf16", "int8", "int4"]))
def test_every_layer_and_head_owned_once(cfg, devs, precision):
    p = plan_partition(cfg, devs, [], precision=precision, context=256, prompt_tokens=16)
    assert len(p.stages) == len({d.host for d in devs})  # one stage per host by default
    layers = [layer for s in p.stages for layer in range(*s.layers)]
    assert layers == list(range(cfg.num_layers))
    assert all(s.num_layers >= 1 for s in p.stages)
    for s in p.stages:
        q_heads = sorted(q for r in s.plan.ranks for q in r.q_heads)
        assert q_heads == list(range(cfg.num_heads))
        kv_heads = {k for r in s.plan.ranks for k in r.kv_heads}
        assert kv_heads == set(range(cfg.num_kv_heads))
        for r in s.plan.ranks:  # every query head's KV head lives on the same rank
            assert {q // cfg.group_size for q in r.q_heads} <= set(r.kv_heads)
        assert {p.ranks[g].stage for g in s.ranks} == {s.index}
    assert sorted(g for s in p.stages for g in s.ranks) == list(range(len(devs)))


@PROPERTY
@given(model_shapes(), clusters(), st.integers(1, 4))
def test_engine_plan_of_a_partition_is_valid_and_survives_a_file(cfg, devs, stages):
    stages = min(stages, len(devs))
    biggest = max(len(group) for group in stage_groups(devs, stages))
    # Every rank of a stage needs a query head, an MLP column and a vocabulary row of its own.
    assume(biggest <= min(cfg.num_heads, cfg.intermediate_size, cfg.vocab_size))
    p = plan_partition(cfg, devs, [], precision="bf16", context=256, prompt_tokens=16, force_stages=stages)
    plan = p.engine_plan()
    check_plan(plan, cfg)  # raises BadPlan when a layer, head, column or row is missing or doubled
    assert [st.layers for st in plan.stages] == [s.layers for s in p.stages]
    assert [r.stage for r in plan.ranks] == [ri.stage for ri in p.ranks]
    assert load_plan(p.to_json(), cfg) == plan == load_plan(plan.to_json(), cfg)


@PROPERTY
@given(model_shapes(), clusters(), st.integers(1, 3))
def test_memory_and_fits_agree(cfg, devs, slots):
    p = plan_partition(cfg, devs, [], context=512, slots=slots, prompt_tokens=32)
    for m, r in zip(p.memory_per_device, p.ranks):
        assert m.capacity_gb == r.device.memory_gb
        parts = m.weights_gb + m.kv_cache_gb + m.activations_gb + m.headroom_gb
        assert m.total_gb == pytest.approx(parts)
        if p.fits:
            assert m.total_gb <= m.capacity_gb
    assert p.fits == (not p.problems)
    assert p.predicted["tokens_per_s"] > 0 and p.predicted["ttft_s"] > 0


@PROPERTY
@given(model_shapes(), clusters())
def test_faster_device_never_gets_fewer_layer_weights(cfg, devs):
    """Heads and MLP columns together: a faster device reads at least as many bytes per layer.
    (The columns even out the coarse head split; that needs an MLP bigger than the attention,
    as in every Llama-family model: there MLP weights are 2-4x the attention's.)"""
    attention = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * cfg.hidden_size
    assume(3 * cfg.intermediate_size * cfg.hidden_size >= 2 * attention)
    p = plan_partition(cfg, devs, [], context=256, prompt_tokens=16)
    for s in p.stages:
        pairs = [(p.ranks[g].device.bandwidth_gb_s, layer_params(cfg, shard, 1))
                 for g, shard in zip(s.ranks, s.plan.ranks)]
        for bw_a, params_a in pairs:
            for bw_b, params_b in pairs:
                if bw_a > bw_b:
                    assert params_a >= params_b


@PROPERTY
@given(model_shapes(), clusters(), st.sampled_from(["bf16", "int4"]))
def test_partition_json_round_trip(cfg, devs, precision):
    p = plan_partition(cfg, devs, [parse_link("h0-h1:10gbe")], precision=precision, context=128, prompt_tokens=8)
    assert Partition.from_json(p.to_json()) == p
    assert describe(p)


def test_70b_bf16_on_four_4090s_does_not_fit_and_says_why():
    p = plan_partition(preset("llama-3.1-70b"), devices("ws1:rtx4090", 4), [])
    assert not p.fits
    assert any("rtx4090" in x and "short by" in x and "GB" in x for x in p.problems)
    assert any("int4" in x for x in p.suggestions)
    text = describe(p)
    assert "does not fit" in text and "int4" in text


def test_70b_int4_fits_on_four_4090s():
    p = plan_partition(preset("llama-3.1-70b"), devices("ws1:rtx4090", 4), [], precision="int4")
    assert p.fits and not p.problems and len(p.stages) == 1


def test_70b_int4_fits_on_one_a100():
    p = plan_partition(preset("llama-3.1-70b"), devices("ws1:a100-80gb", 1), [], precision="int4")
    assert p.fits
    assert p.memory_per_device[0].weights_gb == pytest.approx(70.6 * 0.5, rel=0.02)  # ~70.6 B parameters


def test_hosts_on_1gbe_pipeline_and_are_slower_than_one_pcie_host():
    cfg = preset("llama-3.1-70b")
    spread = [parse_device(f"ws{i}:rtx4090") for i in range(4)]
    links = [parse_link(f"ws{i}-ws{i + 1}:1gbe") for i in range(3)]
    apart = plan_partition(cfg, spread, links, precision="int4")
    together = plan_partition(cfg, devices("ws1:rtx4090", 4), [], precision="int4")
    assert len(apart.stages) == 4 and len(together.stages) == 1
    assert apart.predicted["tokens_per_s"] < together.predicted["tokens_per_s"]
    assert all("1gbe" in name for name in apart.predicted["bytes_per_token"])


def test_force_stages():
    cfg = preset("llama-3.1-8b")
    one_host = plan_partition(cfg, devices("ws1:rtx4090", 4), [], force_stages=2)
    assert [len(s.ranks) for s in one_host.stages] == [2, 2]
    assert [s.layers for s in one_host.stages] == [(0, 16), (16, 32)]
    spread = [parse_device(f"ws{i}:rtx3090") for i in range(2)]
    merged = plan_partition(cfg, spread, [parse_link("ws0-ws1:1gbe")], force_stages=1)
    assert len(merged.stages) == 1 and merged.stages[0].host == "ws0+ws1"
    assert "stage0:allreduce(1gbe)" in merged.predicted["bytes_per_token"]
    piped = plan_partition(cfg, spread, [parse_link("ws0-ws1:1gbe")])
    assert piped.predicted["tokens_per_s"] > merged.predicted["tokens_per_s"]  # head-shard over Ethernet costs
    with pytest.raises(BadPlan):
        plan_partition(cfg, spread, [], force_stages=3)


def test_layers_follow_stage_bandwidth():
    devs = [parse_device("fast:h100"), parse_device("slow:rtx3090")]
    p = plan_partition(preset("llama-3.1-8b"), devs, [])
    assert p.stages[0].num_layers > p.stages[1].num_layers


def test_moe_counts_all_experts_in_memory_and_active_ones_per_token():
    cfg = preset("mixtral-8x22b")
    p = plan_partition(cfg, devices("ws1:h100", 4), [])
    total_params = p.memory_per_device[0].weights_gb * 4 / 2
    assert total_params == pytest.approx(141, rel=0.03)  # Mixtral 8x22B: ~141 B parameters
    explicit = plan_partition(cfg, devices("ws1:h100", 4), [], moe=MOE["mixtral-8x22b"])
    assert explicit == p  # the preset's expert counts are found by its shape
    assert p.predicted["tokens_per_s"] > 1 / (141e9 * 2 / 4 / 3350e9)  # reads far less than all experts


def test_suggestions_come_from_re_planning():
    p = plan_partition(preset("llama-3.1-8b"), devices("ws1:rtx4090", 1), [], context=131072, slots=2)
    assert not p.fits
    for s in p.suggestions:
        assert "would fit" in s
    assert any(s.startswith("context ") for s in p.suggestions)
    assert any("more 24 GB" in s for s in p.suggestions)


def test_links_and_defaults():
    assert parse_link("a-b:10gbe").bandwidth_gb_s == 1.25
    assert parse_link("gpu-box,cpu-box:nvlink").a_host == "gpu-box"
    assert link_between("a", "a", []).kind == "pcie"
    assert link_between("a", "b", []).kind == "1gbe"
    assert link_between("b", "a", [parse_link("a-b:10gbe")]).kind == "10gbe"
    for bad in ("a-b", "a-b:carrier-pigeon", "a-b-c:pcie"):
        with pytest.raises(BadPlan):
            parse_link(bad)


def test_bad_input_raises_bad_plan():
    with pytest.raises(BadPlan):
        plan_partition(preset("smollm2-135m"), [], [])
    with pytest.raises(BadPlan, match="known kinds"):
        parse_device("ws1:tpu9")
    with pytest.raises(BadPlan):
        parse_device("rtx4090")
    with pytest.raises(BadPlan):
        plan_partition(preset("smollm2-135m"), devices("ws1:cpu", 1), [], precision="fp8")


def test_presets():
    assert set(PRESETS) >= {"smollm2-135m", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2-7b", "mixtral-8x22b"}
    assert preset("qwen2-7b").qkv_bias and preset("smollm2-135m").tie_word_embeddings
    with pytest.raises(UnknownPreset, match="llama-3.1-8b"):
        preset("gpt-5")
    assert issubclass(UnknownPreset, LlmdError)
    assert device_kind("h100").bandwidth_gb_s == 3350


def test_check_plan_names_what_is_wrong():
    cfg = preset("smollm2-135m")
    good = plan_partition(cfg, devices("a:cpu", 2) + devices("b:cpu", 1), precision="fp32").engine_plan()
    check_plan(good, cfg)
    d = good.to_dict()
    d["stages"][1]["layers"] = [21, 30]  # layer 20 in no stage
    with pytest.raises(BadPlan, match="cover layers 0..29"):
        check_plan(Plan.from_dict(d), cfg)
    d = good.to_dict()
    d["ranks"][1]["q_heads"] = d["ranks"][1]["q_heads"][1:]  # a query head nobody computes
    with pytest.raises(BadPlan, match="stage 0: every one of the 9 query heads"):
        check_plan(Plan.from_dict(d), cfg)
    d = good.to_dict()
    d["ranks"][0]["mlp_columns"] = [0, 100]  # a gap in the MLP columns
    with pytest.raises(BadPlan, match="mlp_columns"):
        check_plan(Plan.from_dict(d), cfg)
    with pytest.raises(BadPlan, match="does not fit its devices"):
        load_plan(plan_partition(preset("llama-3.1-70b"), devices("a:rtx4090", 1)).to_json(), cfg)
    with pytest.raises(BadPlan, match="not a plan"):
        load_plan('{"hello": 1}', cfg)
