"""What a request costs: measured energy × electricity price, plus hourly node prices × time share.

Energy is the integral of a device's power over the request's time. Power comes
from NVML on GPUs; on CPU-only machines it is estimated from CPU utilisation and
a configurable TDP (`cpu_power_w`), and such figures carry `estimated=True` all
the way to the UI. Plain functions over plain data, so known power traces test
them exactly.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import pairwise
from dataclasses import dataclass

from llmd.app.store import Settings

J_PER_KWH = 3.6e6


def _clean(trace: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted by time, readings without power dropped, one reading per time (the last one wins)."""
    by_time = {float(t): float(w) for t, w in sorted(trace, key=lambda p: p[0]) if w is not None and math.isfinite(w)}
    return sorted(by_time.items())


def _watts_at(trace: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation inside the trace (the caller keeps `t` within its time range)."""
    i = bisect_left(trace, (t, -math.inf))
    if i < len(trace) and trace[i][0] == t:
        return trace[i][1]
    (t0, w0), (t1, w1) = trace[i - 1], trace[i]
    return w0 + (w1 - w0) * (t - t0) / (t1 - t0)


def energy_j(trace: list[tuple[float, float]], start: float, end: float) -> float:
    """Joules: the trapezoid integral of (time, watts) over [start, end].

    The edges are interpolated between the neighbouring readings. Outside the trace there is no
    reading, so nothing is counted there (no extrapolation): pass readings that bracket the
    interval (`Store.power_traces` pads for this). No overlap gives 0.
    """
    points = _clean(trace)
    if len(points) < 2:
        return 0.0
    a, b = max(start, points[0][0]), min(end, points[-1][0])
    if a >= b:
        return 0.0
    inside = [(a, _watts_at(points, a))] + [p for p in points if a < p[0] < b] + [(b, _watts_at(points, b))]
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in pairwise(inside))


def cpu_power_w(utilisation_percent: float, tdp_w: float, idle_fraction: float = 0.1) -> float:
    """An estimate of a CPU package's power from its utilisation.

    Linear between idle and TDP: idle_fraction × TDP at 0 %, the full TDP at 100 %. Real packages
    are roughly linear in load between those ends (turbo can exceed TDP briefly; deep idle can be
    lower), which is good enough to compare costs, not to bill. Utilisation is clamped to 0..100.
    """
    u = min(max(utilisation_percent, 0.0), 100.0) / 100.0
    idle = idle_fraction * tdp_w
    return idle + (tdp_w - idle) * u


@dataclass
class RequestCost:
    energy_j: float
    energy_cost: float  # in settings.currency
    node_cost: float
    total: float
    estimated: bool  # some power was estimated (CPU), not measured


def request_cost(traces: dict[str, list[tuple[float, float]]], start: float, end: float, settings: Settings,
                 node_share: dict[str, float] | None = None, estimated: bool = False,
                 share: float = 1.0) -> RequestCost:
    """The cost of a request that ran over [start, end] on the devices whose power `traces` hold.

    energy_cost = kWh over all traces × electricity price. node_cost = Σ over the nodes with an hourly
    price of price × hours × share, where share is the request's share of that node's time (1.0 unless
    `node_share` says otherwise: 1/n for n requests batched together, 0 for a node it did not use).
    `share` scales both: the request's part of the pool's time over [start, end] (batched with others).
    """
    joules = share * sum(energy_j(trace, start, end) for trace in traces.values())
    energy_cost = joules / J_PER_KWH * settings.electricity_per_kwh
    hours = max(end - start, 0.0) / 3600.0
    shares = node_share or {}
    node_cost = share * sum(price * hours * shares.get(node, 1.0) for node, price in settings.node_hourly.items())
    return RequestCost(joules, energy_cost, node_cost, energy_cost + node_cost, estimated)


def cost_per_million_tokens(total_cost: float, tokens: int) -> float | None:
    """Cost per 1M tokens; None when there are no tokens (not 0, which would look free)."""
    return None if tokens <= 0 else total_cost / tokens * 1e6


def traces_from_samples(samples: list[dict], tdp_w: float | None = None) -> tuple[dict[str, list], bool]:
    """Power traces keyed "node/device" from `Store.samples()` rows, and whether any power is estimated.

    A row without measured power is estimated from its utilisation with `cpu_power_w` when `tdp_w`
    is given (a CPU-only machine), and skipped otherwise.
    """
    traces: dict[str, list] = {}
    estimated = False
    for s in samples:
        watts = s.get("power_w")
        if watts is None and tdp_w is not None:
            watts = cpu_power_w(s["utilisation"], tdp_w)
            estimated = True
        elif watts is not None:
            estimated = estimated or bool(s.get("power_estimated"))
        if watts is not None:
            traces.setdefault(f"{s['node']}/{s['device']}", []).append((s["time"], watts))
    return traces, estimated


def _finished(requests: list[dict]) -> list[dict]:
    return [r for r in requests if r.get("finished") is not None]


def cost_summary(requests: list[dict]) -> dict:
    """Totals over the finished requests: {"requests", "tokens", "cost", "energy_j", "cost_per_million",
    "estimated"}. Tokens are generated tokens; "estimated" when any request's energy was."""
    done = _finished(requests)
    tokens = sum(r.get("generated_tokens") or 0 for r in done)
    cost = sum(r.get("cost") or 0.0 for r in done)
    return {"requests": len(done), "tokens": tokens, "cost": cost,
            "energy_j": sum(r.get("energy_j") or 0.0 for r in done),
            "cost_per_million": cost_per_million_tokens(cost, tokens),
            "estimated": any(r.get("energy_estimated") for r in done)}


def cost_series(requests: list[dict], bucket_s: float) -> list[dict]:
    """Cost over time from finished requests' rows, one dict per bucket of `bucket_s` seconds.

    Each request counts in the bucket of its `finished` time. Buckets are aligned to multiples of
    `bucket_s` and run from the first to the last one with a request, empty ones included (so a plot
    shows idle time). Keys: "time" (bucket start), "tokens" (generated), "cost", "cost_per_million"
    (None for a bucket without tokens), "energy_j", "tokens_per_s" (tokens / bucket_s).
    """
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be positive, got {bucket_s}")
    done = _finished(requests)
    if not done:
        return []
    buckets: dict[int, list[dict]] = {}
    for r in done:
        buckets.setdefault(int(r["finished"] // bucket_s), []).append(r)
    out = []
    for k in range(min(buckets), max(buckets) + 1):
        s = cost_summary(buckets.get(k, []))
        out.append({"time": k * bucket_s, "tokens": s["tokens"], "cost": s["cost"],
                    "cost_per_million": s["cost_per_million"], "energy_j": s["energy_j"],
                    "tokens_per_s": s["tokens"] / bucket_s})
    return out
