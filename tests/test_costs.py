"""The cost model on known power traces: energy integrals, the CPU estimate, node prices, cost per 1M tokens."""

import pytest

from llmd.app.costs import (RequestCost, cost_per_million_tokens, cost_series, cost_summary, cpu_power_w, energy_j,
                            request_cost, traces_from_samples)
from llmd.app.store import Sample, Settings, Store


def constant(watts: float, start: float, end: float, step: float = 1.0) -> list[tuple[float, float]]:
    n = round((end - start) / step)
    return [(start + i * step, watts) for i in range(n + 1)]


def test_constant_100_w_for_36_s_is_3600_j_and_one_thousandth_kwh():
    trace = constant(100.0, 0.0, 36.0)
    assert energy_j(trace, 0.0, 36.0) == pytest.approx(3600.0)
    cost = request_cost({"ws1/cuda:0": trace}, 0.0, 36.0, Settings(electricity_per_kwh=0.30))
    assert cost.energy_j == pytest.approx(3600.0)
    assert cost.energy_cost == pytest.approx(0.001 * 0.30)
    assert cost.node_cost == 0.0 and cost.total == pytest.approx(0.0003) and cost.estimated is False


def test_a_ramp_integrates_exactly_and_interpolates_its_edges():
    ramp = [(0.0, 0.0), (10.0, 100.0)]  # two readings: 10 W more per second
    assert energy_j(ramp, 0.0, 10.0) == pytest.approx(500.0)
    assert energy_j(ramp, 2.5, 7.5) == pytest.approx(250.0)  # ∫ 10t dt from 2.5 to 7.5
    assert energy_j(ramp, 4.0, 6.0) == pytest.approx(100.0)  # between two readings: both edges interpolated
    fine = [(t / 10, t) for t in range(101)]  # the same ramp sampled every 0.1 s
    assert energy_j(fine, 2.5, 7.5) == pytest.approx(250.0)


def test_partial_and_no_overlap():
    trace = constant(50.0, 0.0, 10.0)
    assert energy_j(trace, 5.0, 20.0) == pytest.approx(250.0)  # nothing counted past the last reading
    assert energy_j(trace, -5.0, 2.0) == pytest.approx(100.0)
    assert energy_j(trace, 20.0, 30.0) == 0.0
    assert energy_j(trace, 6.0, 6.0) == 0.0 and energy_j(trace, 7.0, 3.0) == 0.0
    assert energy_j([(1.0, 100.0)], 0.0, 2.0) == 0.0 and energy_j([], 0.0, 2.0) == 0.0


def test_unsorted_duplicate_and_missing_readings():
    trace = [(2.0, 100.0), (0.0, 100.0), (1.0, None), (1.0, 100.0), (4.0, 100.0)]
    assert energy_j(trace, 0.0, 4.0) == pytest.approx(400.0)


def test_cpu_power_estimate_is_linear_from_idle_to_tdp():
    assert cpu_power_w(0.0, 65.0) == pytest.approx(6.5)
    assert cpu_power_w(100.0, 65.0) == pytest.approx(65.0)
    assert cpu_power_w(50.0, 65.0) == pytest.approx(35.75)
    assert cpu_power_w(150.0, 65.0) == pytest.approx(65.0) and cpu_power_w(-5.0, 65.0) == pytest.approx(6.5)
    assert cpu_power_w(50.0, 100.0, idle_fraction=0.2) == pytest.approx(60.0)


def test_cpu_samples_give_an_estimated_cost():
    samples = [{"time": float(t), "node": "laptop", "device": "cpu:0", "utilisation": 100.0, "power_w": None}
               for t in range(11)]
    traces, estimated = traces_from_samples(samples, tdp_w=65.0)
    assert estimated is True and traces["laptop/cpu:0"][0] == (0.0, 65.0)
    cost = request_cost(traces, 0.0, 10.0, Settings(), estimated=estimated)
    assert cost.energy_j == pytest.approx(650.0) and cost.estimated is True
    skipped, estimated = traces_from_samples(samples)  # without a TDP there is nothing to estimate from
    assert skipped == {} and estimated is False


def test_node_hourly_prices_times_share():
    settings = Settings(electricity_per_kwh=0.0, node_hourly={"a": 3.6, "b": 1.0})
    cost = request_cost({}, 0.0, 36.0, settings, node_share={"a": 0.5})  # 36 s = 0.01 h
    assert cost.node_cost == pytest.approx(3.6 * 0.01 * 0.5 + 1.0 * 0.01)  # b's share defaults to 1.0
    assert cost.energy_cost == 0.0 and cost.total == pytest.approx(0.028)
    unused = request_cost({}, 0.0, 36.0, settings, node_share={"a": 0.0, "b": 0.0})
    assert unused.total == 0.0


def test_energy_and_node_prices_add_up_over_devices():
    settings = Settings(electricity_per_kwh=0.5, node_hourly={"ws1": 2.0})
    traces = {"ws1/cuda:0": constant(200.0, 0.0, 72.0), "ws1/cuda:1": constant(100.0, 0.0, 72.0)}
    cost = request_cost(traces, 0.0, 72.0, settings)
    assert cost.energy_j == pytest.approx(300.0 * 72)
    assert cost.energy_cost == pytest.approx(300.0 * 72 / 3.6e6 * 0.5)
    assert cost.node_cost == pytest.approx(2.0 * 72 / 3600)
    assert cost == RequestCost(cost.energy_j, cost.energy_cost, cost.node_cost,
                               cost.energy_cost + cost.node_cost, False)


def test_cost_per_million_tokens():
    assert cost_per_million_tokens(0.5, 250_000) == pytest.approx(2.0)
    assert cost_per_million_tokens(0.003, 1500) == pytest.approx(2.0)
    assert cost_per_million_tokens(1.0, 0) is None


def test_cost_series_and_summary_from_request_rows():
    rows = [
        {"finished": 5.0, "generated_tokens": 100, "cost": 0.001, "energy_j": 10.0, "energy_estimated": False},
        {"finished": 8.0, "generated_tokens": 300, "cost": 0.002, "energy_j": 30.0, "energy_estimated": False},
        {"finished": 31.0, "generated_tokens": 50, "cost": 0.0005, "energy_j": 5.0, "energy_estimated": True},
        {"finished": None, "generated_tokens": 999, "cost": 9.0, "energy_j": 99.0},  # still running: left out
    ]
    series = cost_series(rows, bucket_s=10.0)
    assert [b["time"] for b in series] == [0.0, 10.0, 20.0, 30.0]  # empty buckets kept, so idle time shows
    first = series[0]
    assert first["tokens"] == 400 and first["cost"] == pytest.approx(0.003) and first["energy_j"] == 40.0
    assert first["cost_per_million"] == pytest.approx(7.5) and first["tokens_per_s"] == pytest.approx(40.0)
    assert series[1]["tokens"] == 0 and series[1]["cost_per_million"] is None
    assert series[3]["cost_per_million"] == pytest.approx(10.0)
    summary = cost_summary(rows)
    assert summary["requests"] == 3 and summary["tokens"] == 450 and summary["estimated"] is True
    assert summary["cost_per_million"] == pytest.approx(0.0035 / 450 * 1e6)
    assert cost_series([], 10.0) == []
    with pytest.raises(ValueError):
        cost_series(rows, 0.0)


def test_a_request_costed_from_stored_samples(tmp_path):
    """The whole path: 1 s samples in the store, a request between two of them, its cost journalled."""
    with Store(tmp_path / "llmd.db") as store:
        store.add_samples([Sample(100.0 + i, "ws1", "cuda:0", 90.0, 8000.0, 24000.0, 200.0, 65.0)
                           for i in range(20)])
        settings = Settings(electricity_per_kwh=0.36)
        rid = store.add_request("alice", "m", 10)
        traces, estimated = store.power_traces(105.5, 115.5)
        cost = request_cost(traces, 105.5, 115.5, settings, estimated=estimated)
        assert cost.energy_j == pytest.approx(2000.0) and cost.estimated is False
        store.update_request(rid, status="done", generated_tokens=1000, energy_j=cost.energy_j, cost=cost.total,
                             energy_estimated=cost.estimated, finished=115.5)
        [row] = store.requests()
        assert row["cost"] == pytest.approx(2000.0 / 3.6e6 * 0.36)
        assert cost_summary([row])["cost_per_million"] == pytest.approx(0.2)
