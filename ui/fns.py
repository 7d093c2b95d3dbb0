"""What the page shows, computed from plain data: tables and plot frames (pandas), text and HTML.

No Gradio and no pool here, so every view is testable without a browser or a running engine.
"""

import html
import math
import re
import statistics
import time
from dataclasses import replace

import pandas as pd

from llmd.app import costs
from llmd.app.pool import Fetch, Found, Progress, Reply
from llmd.app.store import Settings

MASK = "•" * 12
# Colours per rank, shared by every drawing so rank 2 is the same colour everywhere.
RANK_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6",
                "#9d755d", "#bab0ac"]
STATS_LINE = re.compile(r"\n\n\*\d+ tokens · [^*]*\*$")  # `reply_stats` appended to a reply


# ---- status and chat

HINTS = {"resolving the model": "converting the bundled model on first use takes about 20 s",
         "warming up": "compiling the decode step"}


def status_markdown(p: Progress, now: float, waiting: int = 0, problem: str = "", running: str = "") -> str:
    elapsed = f"{now - p.since:.0f} s"
    if p.phase == "ready":
        text = "**ready**" + (f": {running}" if running else "")
    elif p.phase == "failed":
        text = f"**failed**: {p.error} — fix it and press *Relaunch* in the Cluster tab"
    elif p.phase == "waiting":
        text = "**waiting for agents**: join some in the Cluster tab, then *Launch on joined agents*"
    elif p.phase == "stopped":
        text = "**stopped**"
    else:
        hint = f"; {HINTS[p.phase]}" if p.phase in HINTS else ""
        text = f"**loading**: {p.phase} ({p.fraction:.0%}, {elapsed}{hint})"
    extra = [f"{waiting} request(s) waiting"] if waiting else []
    extra += [problem] if problem else []
    return " · ".join([text, *extra])


def progress_html(p: Progress) -> str:
    width = 100 if p.phase in ("ready", "failed") else int(p.fraction * 100)
    colour = {"ready": "#54a24b", "failed": "#e45756"}.get(p.phase, "#4c78a8")
    return (f'<div class="llmd-progress" data-phase="{html.escape(p.phase)}" style="height:6px;background:#ddd">'
            f'<div style="width:{width}%;height:6px;background:{colour}"></div></div>')


def message_text(content) -> str:
    """A Chatbot message's text: a plain string, or Gradio's list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return ""


def chat_messages(history: list[dict]) -> list[dict]:
    """Chatbot history -> the model's messages: plain text, the stats line taken off each reply."""
    out = []
    for m in history:
        text = message_text(m.get("content"))
        if m.get("role") == "assistant":
            text = STATS_LINE.sub("", text)
        if m.get("role") in ("user", "assistant", "system") and text:
            out.append({"role": m["role"], "content": text})
    return out


def reply_stats(r: Reply) -> str:
    line = f"{r.tokens} tokens · {r.tokens_per_s:.1f} tokens/s · first token {r.ttft_s * 1000:.0f} ms"
    return line + (" · stopped" if r.finish_reason == "cancelled" else "")


def trimmed_note(t) -> str:
    """What the page says when a chat's oldest turns were left out to fit the context."""
    return (f"the oldest {t.turns} message(s) were left out so the chat fits the model's context "
            f"({t.prompt_tokens} prompt tokens)")


def with_stats(text: str, r: Reply) -> str:
    return f"{text}\n\n*{reply_stats(r)}*"


# ---- cluster

def peers_frame(peers: list[dict]) -> pd.DataFrame:
    cols = ["name", "address", "devices", "free MB", "health", "joined", "model slices", "this machine"]
    rows = [[p["name"], f"{p['address']}:{p['port']}", p["devices"], p["free_mb"], p["health"],
             "joined" if p["joined"] else "not joined", fetch_text(p.get("fetch")), "yes" if p.get("local") else ""]
            for p in peers]
    return pd.DataFrame(rows, columns=cols)


def models_frame(models: list[tuple[Found, list[str]]]) -> pd.DataFrame:
    rows = [[m.name, size_text(m.bytes), ", ".join(fits) if fits else ("?" if m.config else "after converting")]
            for m, fits in models]
    return pd.DataFrame(rows, columns=["model", "weights on disk", "precisions that fit (planner)"])


def model_choices(models: list[tuple[Found, list[str]]]) -> list[tuple[str, str]]:
    return [(f"{m.name} ({size_text(m.bytes)})", m.name) for m, _ in models]


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.0f} MB"


def fetch_text(f: Fetch | None) -> str:
    """An agent's fetch of its slices from this host (app/host.py `Fetch`): bytes, rate, time left."""
    if f is None:
        return ""
    if f.total == 0:
        return "had them all"
    if f.bytes >= f.total:
        return f"fetched {f.bytes / 1e6:,.1f} MB"
    left = "" if f.left_s is None else f", {f.left_s:,.0f} s left"
    return f"{f.bytes / 1e6:,.1f} of {f.total / 1e6:,.1f} MB, {f.rate / 1e6:,.1f} MB/s{left}"


def join_command(secret: str, reveal: bool) -> str:
    shown = secret if reveal else MASK
    return ("# on the new workstation, in a copy of llmd:\n"
            "bash installers/setup.sh\n"
            f"LLMD_POOL_SECRET={shown} .venv/bin/llmd agent")


def peer_names(peers: list[dict]) -> list[str]:
    return [p["name"] for p in peers if not p.get("local")] + [p["name"] for p in peers if p.get("local")]


# ---- devices (the GPUs tab)

def device_label(row: dict) -> str:
    return f"{row['node']}/{row['device']}"


def device_name(row: dict, names: dict[tuple[str, str], str]) -> str:
    name = names.get((row["node"], row["device"]))
    if name:
        return name
    if row["device"].startswith("cpu:"):
        rank = row["device"].split(":", 1)[1]
        return f"CPU, rank {rank}" + (" (host process)" if rank == "0" else "")
    return row["device"]


def devices_frame(samples: list[dict], names: dict[tuple[str, str], str]) -> pd.DataFrame:
    """One row per device: its latest sample."""
    latest: dict[tuple[str, str], dict] = {}
    for s in samples:
        latest[(s["node"], s["device"])] = s
    cols = ["node", "device", "name", "utilisation %", "memory MB", "power W", "temperature °C"]
    rows = []
    for (node, device), s in sorted(latest.items()):
        power = "" if s["power_w"] is None else f"{s['power_w']:.1f}" + (" (est.)" if s["power_estimated"] else "")
        temp = "" if s["temperature_c"] is None else f"{s['temperature_c']:.0f}"
        memory = f"{s['memory_used_mb']:.0f} / {s['memory_total_mb']:.0f}"
        rows.append([node, device, device_name(s, names), round(s["utilisation"], 1), memory, power, temp])
    return pd.DataFrame(rows, columns=cols)


def samples_frame(samples: list[dict]) -> pd.DataFrame:
    """Long format for the line plots: time, device, and one column per metric."""
    cols = ["time", "device", "utilisation", "memory_used_mb", "power_w", "temperature_c"]
    if not samples:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(samples)
    df["time"] = pd.to_datetime(df["time"], unit="s")
    df["device"] = df["node"] + "/" + df["device"]
    return df[cols]


def metric_frame(samples: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows that have this metric (temperature is often missing on CPUs and VMs)."""
    return samples[["time", "device", metric]].dropna(subset=[metric]).reset_index(drop=True)


# ---- plan

def owners(plan: dict) -> tuple[list[list[int]], int]:
    """For every layer, the rank holding each query head; and the number of query heads."""
    heads = plan.get("num_heads") or 1 + max(h for r in plan["ranks"] for h in r["q_heads"])
    layers = plan.get("num_layers") or max(st["layers"][1] for st in plan["stages"])
    grid = [[-1] * heads for _ in range(layers)]
    for st in plan["stages"]:
        for layer in range(*st["layers"]):
            for rank in st["ranks"]:
                for h in plan["ranks"][rank]["q_heads"]:
                    grid[layer][h] = rank
    return grid, heads


def plan_heatmap_html(plan: dict) -> str:
    """Layers (rows) x query heads (columns), each cell coloured by the rank that computes it."""
    grid, heads = owners(plan)
    cell = "width:22px;height:12px;border:1px solid #fff"
    head = "".join(f'<th style="font-size:10px">{h}</th>' for h in range(heads))
    rows = []
    for layer, ranks in enumerate(grid):
        cells = "".join(f'<td class="plan-cell" data-rank="{r}" title="layer {layer}, head {h}: rank {r}" '
                        f'style="{cell};background:{RANK_COLOURS[r % len(RANK_COLOURS)]}"></td>'
                        for h, r in enumerate(ranks))
        rows.append(f'<tr><th style="font-size:10px;text-align:right">{layer}</th>{cells}</tr>')
    legend = " ".join(f'<span style="display:inline-block;width:12px;height:12px;'
                      f'background:{RANK_COLOURS[r % len(RANK_COLOURS)]}"></span> rank {r}'
                      for r in range(len(plan["ranks"])))
    return (f'<div id="plan-heatmap-grid" data-ranks="{len(plan["ranks"])}">'
            f'<div style="margin-bottom:4px">{legend}</div>'
            '<div style="font-size:12px">rows: layers · columns: query heads · colour: the rank holding them</div>'
            f'<table style="border-collapse:collapse"><tr><th></th>{head}</tr>{"".join(rows)}</table></div>')


def shares_frame(plan: dict) -> pd.DataFrame:
    """Per part of the model, each rank's share in percent (the stacked bar of a part sums to 100).
    Heads and columns count once per layer of the rank's pipeline stage."""
    def layers(r: dict) -> int:
        return _span(plan["stages"][r["stage"]]["layers"])

    parts = {
        "attention (query heads x layers)": lambda r: len(r["q_heads"]) * layers(r),
        "KV cache (KV groups x layers)": lambda r: len(r["kv_groups"]) * layers(r),
        "MLP (columns x layers)": lambda r: _span(r["mlp_columns"]) * layers(r),
        "vocabulary rows": lambda r: _span(r["vocab_rows"]),
    }
    rows = []
    for part, size in parts.items():
        sizes = [size(r) for r in plan["ranks"]]
        rows += [{"part": part, "rank": f"rank {r['rank']}", "share %": round(100 * s / sum(sizes), 2)}
                 for r, s in zip(plan["ranks"], sizes, strict=True)]
    return pd.DataFrame(rows)


def _span(r) -> int:
    return r[1] - r[0]


def plan_summary(entry: dict | None) -> str:
    if not entry:
        return "No plan yet: the engine has not launched."
    plan = entry["plan"]
    where = ", ".join(f"rank {d['rank']}: {d['node']} {d['device']}" for d in plan.get("devices", []))
    stages = "; ".join(f"stage {i}: layers {st['layers'][0]}-{st['layers'][1] - 1} on ranks "
                       f"{', '.join(map(str, st['ranks']))}" for i, st in enumerate(plan["stages"]))
    replicated = " (KV heads replicated, query heads split)" if plan.get("kv_replicated") else ""
    return (f"**{plan.get('model', 'model')}** on {plan['world_size']} rank(s), plan epoch {plan['epoch']}"
            f"{replicated}  \n{stages}  \n{where}")


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def prediction_frame(entry: dict | None, requests: list[dict]) -> pd.DataFrame:
    """The planner's figures beside the measured ones (medians of the finished requests since the plan)."""
    cols = ["figure", "predicted", "measured"]
    if not entry:
        return pd.DataFrame(columns=cols)
    predicted = entry.get("predicted") or {}
    done = [r for r in requests if r["status"] == "done" and r["created"] >= entry["time"]]
    prompt = _median([r["prompt_tokens"] for r in done])
    ttft = predicted.get("ttft_s")
    if ttft is not None and prompt:  # the prediction is linear in the prompt's length
        ttft = ttft * prompt / predicted.get("prompt_tokens", 512)
    rows = [["decode tokens/s", _fmt(predicted.get("tokens_per_s")),
             _fmt(_median([r["decode_tokens_per_s"] for r in done if r["generated_tokens"] > 1]))],
            [f"time to first token, ms (prompt {prompt or '?'} tokens)", _fmt(ttft and ttft * 1000),
             _fmt(_median([r["ttft_s"] * 1000 for r in done if r["ttft_s"] is not None]))]]
    measured = entry["plan"].get("measured") or []
    for rank, weights in enumerate(predicted.get("weights_gb") or []):
        got = measured[rank]["weights_mb"] * 2**20 / 1e6 if rank < len(measured) else None  # the engine counts MiB
        rows.append([f"rank {rank} weights, MB", _fmt(weights * 1000), _fmt(got)])
    return pd.DataFrame(rows, columns=cols)


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


# ---- balancer

def migrations_frame(events: list[dict]) -> pd.DataFrame:
    cols = ["time", "step", "epoch", "moved", "from → to", "why", "step ms before", "step ms after", "took s"]
    rows = []
    for e in events:
        moved = ", ".join(f"{k.replace('_', ' ')} {v}" for k in ("layers", "kv_groups", "mlp_columns")
                          if (v := e.get(k)))
        rows.append([_clock(e.get("time")), e.get("step", ""), e.get("epoch", ""), moved,
                     f"rank {e.get('from_rank', '?')} → rank {e.get('to_rank', '?')}", e.get("reason", ""),
                     _ms(e.get("step_ms_before")), _ms(e.get("step_ms_after")), _fmt(e.get("duration_s"))])
    return pd.DataFrame(rows, columns=cols)


def _ms(v) -> str:
    if isinstance(v, list):
        return " / ".join(f"{x:.1f}" for x in v)
    return _fmt(v)


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def rank_steps_frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=["time", "rank", "step_ms"])
    df = pd.DataFrame(rows)
    df["time"] = pd.to_datetime(df["time"], unit="s")
    df["rank"] = "rank " + df["rank"].astype(str)
    return df


def balancer_note(events: list[dict], steps: list[dict]) -> str:
    if events:
        return f"{len(events)} migration(s); the latest at {_clock(events[-1].get('time'))}."
    if steps:
        return "No migration yet: the ranks' step times are within the balancer's threshold."
    return ("No migration and no step times yet: the balancer reports here once it measures the ranks "
            "(after a few decode steps) and whenever it moves KV groups or MLP columns between them.")


# ---- costs

def time_share(r: dict) -> float:
    """A request's share of the pool's time while it ran (batched with others: less than 1)."""
    busy, start = r.get("busy_s"), r.get("started") or r["created"]
    span = r["finished"] - start
    return 1.0 if busy is None or span <= 0 else min(busy / span, 1.0)


def cost_by_key(requests: list[dict], settings: Settings) -> pd.DataFrame:
    """Finished requests' tokens and cost per API key (the web page's chats under "web page")."""
    cols = ["key", "requests", "tokens", f"cost {settings.currency}", f"per 1M tokens {settings.currency}"]
    totals: dict[str, list] = {}
    for r in recost([r for r in requests if r.get("finished") is not None], settings):
        t = totals.setdefault(r.get("api_key") or ("web page" if r.get("user") == "web" else r.get("user") or "api"),
                              [0, 0, 0.0])
        t[0], t[1], t[2] = t[0] + 1, t[1] + (r["generated_tokens"] or 0), t[2] + (r.get("cost") or 0.0)
    rows = [[k, n, tokens, f"{cost:.6f}", per_million_text(costs.cost_per_million_tokens(cost, tokens))]
            for k, (n, tokens, cost) in sorted(totals.items())]
    return pd.DataFrame(rows, columns=cols)


def per_million_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def keys_frame(keys: list[dict]) -> pd.DataFrame:
    rows = [[k["name"], _clock(k["created"]), "revoked " + _clock(k["revoked"]) if k["revoked"] else "live"]
            for k in keys]
    return pd.DataFrame(rows, columns=["name", "created", "state"])


def recost(requests: list[dict], settings: Settings) -> list[dict]:
    """Each request's cost at today's prices, from its stored energy and duration."""
    out = []
    for r in requests:
        if r.get("finished") is None:
            out.append(r)
            continue
        start = r.get("started") or r["created"]
        c = costs.request_cost({}, start, r["finished"], settings, share=time_share(r))
        energy_cost = (r.get("energy_j") or 0.0) / costs.J_PER_KWH * settings.electricity_per_kwh
        out.append({**r, "cost": energy_cost + c.node_cost})
    return out


def cost_markdown(requests: list[dict], settings: Settings, last: int = 20) -> str:
    """The live figures over the last `last` finished requests."""
    done = [r for r in requests if r.get("finished") is not None and r["status"] in ("done", "cancelled")][-last:]
    if not done:
        return "No finished request yet: send a chat message to measure cost per 1M tokens."
    s = costs.cost_summary(recost(done, settings))
    per_m = s["cost_per_million"]
    estimate = " (estimate: CPU power from utilisation × TDP)" if s["estimated"] else ""
    tps = _median([r["decode_tokens_per_s"] for r in done if (r["generated_tokens"] or 0) > 1])
    ttft = _median([r["ttft_s"] * 1000 for r in done if r["ttft_s"] is not None])
    shown = "—" if per_m is None else f"{per_m:.4f}"
    return (f"**Cost per 1M tokens: {shown} {settings.currency}**{estimate}  \n"
            f"over the last {len(done)} request(s), {s['tokens']} tokens · decode {_fmt(tps)} tokens/s (median) · "
            f"first token {_fmt(ttft)} ms (median) · energy {s['energy_j']:.1f} J{estimate and ' (estimate)'} · "
            f"electricity {settings.electricity_per_kwh:g} {settings.currency}/kWh")


def cost_frame(requests: list[dict], settings: Settings, bucket_s: float = 60.0) -> pd.DataFrame:
    rows = costs.cost_series(recost(requests, settings), bucket_s)
    cols = ["time", "cost_per_million", "tokens_per_s", "energy_j"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    df["time"] = pd.to_datetime(df["time"], unit="s")
    return df[cols]


def requests_frame(requests: list[dict], settings: Settings, last: int = 20) -> pd.DataFrame:
    cols = ["time", "status", "prompt tokens", "tokens", "tokens/s", "first token ms", "energy J",
            f"cost {settings.currency}"]
    rows = [[_clock(r["created"]), r["status"], r["prompt_tokens"], r["generated_tokens"],
             _fmt(r.get("decode_tokens_per_s")), _fmt(r["ttft_s"] and r["ttft_s"] * 1000), _fmt(r.get("energy_j")),
             "—" if r.get("cost") is None else f"{r['cost']:.6f}"]
            for r in reversed(recost(requests, settings)[-last:])]
    return pd.DataFrame(rows, columns=cols)


def parse_node_prices(text: str) -> dict[str, float]:
    """`"ws1=0.5, ws2=1.2"` -> {"ws1": 0.5, "ws2": 1.2}; raises ValueError naming a bad entry."""
    out = {}
    for part in filter(None, (p.strip() for p in re.split(r"[,\n]", text or ""))):
        name, sep, price = part.partition("=")
        try:
            value = float(price)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value) or value < 0:
            raise ValueError(f"{part!r} is not NODE=PRICE with a price of 0 or more")
        out[name.strip()] = value
    return out


def format_node_prices(prices: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in prices.items())


def settings_from_form(price: float, currency: str, node_prices: str, tdp: float, old: Settings) -> Settings:
    if price is None or not price >= 0:
        raise ValueError("the electricity price must be 0 or more")
    if tdp is None or not tdp > 0:
        raise ValueError("the CPU TDP must be more than 0 W")
    return replace(old, electricity_per_kwh=float(price), currency=(currency or old.currency).strip()[:8],
                   node_hourly=parse_node_prices(node_prices), cpu_tdp_w=float(tdp))
