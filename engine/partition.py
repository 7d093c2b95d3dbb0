"""The hierarchical partition planner: pipeline stages across machines, head-shard inside each.

Pure functions over plain data: a model shape, devices and links in; a `Partition` out, with its
memory per device, whether it fits (and if not, why and what would), and a predicted speed.

Shape. One pipeline stage per host by default: inside a host links are fast, so its devices
head-shard (tensor parallel) the stage's layers; across hosts Ethernet latency would cost two
round trips per layer per token, so hosts only pass the hidden state on. Layers are split across
stages in proportion to each stage's total memory bandwidth (every stage >= 1 layer); inside a
stage, `engine.plan.make_plan` splits KV groups, MLP columns and vocabulary rows in proportion to
each device's bandwidth. `force_stages` overrides the stage count: the host-ordered device list is
cut into that many contiguous groups (so head-shard may span machines, and the predicted cost
shows what that costs).

Memory per rank (GB = 1e9 bytes):
  weights     = the rank's shard of its stage's layers (all experts of an MoE) at the precision's
                bytes per parameter, plus embedding rows on the first stage and LM-head rows and the
                final norm on the last stage (a tied embedding is held once per stage that needs it)
  kv_cache    = 2 * layers_in_stage * slots * kv_heads_on_rank * context * head_dim * 2 bytes
                (bf16; 4 bytes when the precision is fp32)
  activations = the prefill of prompt_tokens: tokens * (hidden + local q/k/v + 2 * local MLP
                columns) * activation bytes, plus fp32 logits for the rank's vocabulary rows
  headroom    = 0.5 GB + 5% of capacity (CUDA context, allocator fragmentation)
A device fits when the sum is at most its capacity.

Prediction (decode at batch 1, memory-bound; bandwidths in GB/s = 1e9 bytes/s):
  hidden_bytes     = hidden_size * activation bytes (2; 4 for fp32)
  allreduce(stage) = 2*(n-1)/n * hidden_bytes / link_bw + 2*(n-1) * link_latency, 0 when n == 1,
                     over the slowest link between the stage's hosts (its allreduce_latency_us
                     when given: shared memory between processes on one machine)
  decode time      = sum over stages of (max over its ranks of weight_bytes_read / bandwidth
                     + 2 * layers_in_stage * allreduce(stage))
                     + (stages - 1) * (hidden_bytes / link_bw + link_latency)
                     + driver: with more than one rank, the driver (rank 0, first stage) sends each
                       step's header to every rank (2 latencies of the farthest link) and collects
                       the fp32 logits: vocab_size * 4 bytes from the last stage, or the part not
                       its own when there is one stage; / link_bw + link_latency
  tokens_per_s     = 1 / decode time
  weight_bytes_read counts only the active experts of an MoE and the LM head, not the embedding
  table (one row of it is read per token); KV-cache reads are left out.
  ttft             = sum over stages of the max over its ranks of
                     prompt_tokens * 2 * active_params_on_rank / (tflops * 1e12)
                     + (stages - 1) * (prompt_tokens * hidden_bytes / link_bw + link_latency)
                     + the driver's step, as in decode time
  bytes_per_token  = per link, bytes on the wire per decode token: inside a stage the ring
                     all-reduces (n ranks each send 2*(n-1)/n * hidden_bytes, twice per layer),
                     between stages one hidden state, and the logits back to the driver.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise

from .config import ModelConfig
from .errors import BadPlan
from .plan import Plan, RankShard, StageSpan, apportion, check_plan, contiguous_ranges, make_plan
from .presets import MoE, device_kind, moe_of

GB = 1e9

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}

# Cheaper precisions tried, in order, when a model does not fit.
SMALLER_PRECISIONS = ("int8", "int4")


@dataclass(frozen=True)
class Device:
    host: str
    kind: str
    memory_gb: float
    bandwidth_gb_s: float
    tflops: float


@dataclass(frozen=True)
class Link:
    a_host: str
    b_host: str
    bandwidth_gb_s: float
    latency_us: float
    kind: str
    # One step of an all-reduce, where it differs from a message's latency (processes on one
    # machine all-reduce through shared memory but send through sockets); None: latency_us.
    allreduce_latency_us: float | None = None


LINK_KINDS: dict[str, tuple[float, float]] = {  # kind -> (GB/s, microseconds)
    "nvlink": (300.0, 2.0),
    "pcie": (25.0, 5.0),
    "10gbe": (1.25, 50.0),
    "1gbe": (0.125, 100.0),
}


def parse_device(spec: str) -> Device:
    """`"ws1:rtx4090"` -> a Device with that kind's memory, bandwidth and tflops."""
    host, sep, kind = spec.rpartition(":")
    if not sep or not host or not kind:
        raise BadPlan(f"device spec must be HOST:KIND, got {spec!r}")
    k = device_kind(kind)
    return Device(host=host, kind=k.name, memory_gb=k.memory_gb, bandwidth_gb_s=k.bandwidth_gb_s, tflops=k.tflops)


def make_link(a_host: str, b_host: str, kind: str) -> Link:
    if kind not in LINK_KINDS:
        raise BadPlan(f"unknown link kind {kind!r}; known kinds: {', '.join(LINK_KINDS)}")
    bw, lat = LINK_KINDS[kind]
    return Link(a_host=a_host, b_host=b_host, bandwidth_gb_s=bw, latency_us=lat, kind=kind)


def parse_link(spec: str) -> Link:
    """`"ws1-ws2:10gbe"` (or `"ws1,ws2:10gbe"` for hosts with dashes; `"ws1:nvlink"` inside one host)."""
    hosts, sep, kind = spec.rpartition(":")
    if not sep or not hosts:
        raise BadPlan(f"link spec must be A-B:KIND, got {spec!r}")
    parts = hosts.split(",") if "," in hosts else hosts.split("-")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(parts):
        raise BadPlan(f"link spec must name two hosts as A-B or A,B, got {spec!r}")
    return make_link(parts[0], parts[1], kind)


def link_between(a: str, b: str, links: list[Link]) -> Link:
    """The stated link between two hosts, else PCIe inside one host and 1 GbE between two."""
    for link in links:
        if {link.a_host, link.b_host} == {a, b}:
            return link
    return make_link(a, b, "pcie" if a == b else "1gbe")


def slowest_link(hosts: list[str], links: list[Link]) -> Link:
    """The link a collective over these hosts is limited by: least bandwidth, then most latency."""
    pairs = [(a, b) for i, a in enumerate(hosts) for b in hosts[i:] if a != b or len(hosts) == 1]
    candidates = [link_between(a, b, links) for a, b in pairs]
    return min(candidates, key=lambda l: (l.bandwidth_gb_s, -l.latency_us))


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, int]  # [start, end)
    host: str  # "ws1", or "ws1+ws2" when forced head-shard spans machines
    ranks: list[int]  # global rank ids; the stage's Plan numbers them 0..n-1 in this order
    plan: Plan

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def hosts(self) -> list[str]:
        return self.host.split("+")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    device: Device
    stage: int
    local_rank: int  # its index in the stage's Plan


@dataclass(frozen=True)
class MemoryUse:
    weights_gb: float
    kv_cache_gb: float
    activations_gb: float
    headroom_gb: float
    total_gb: float
    capacity_gb: float

    @property
    def short_gb(self) -> float:
        return max(0.0, self.total_gb - self.capacity_gb)


@dataclass(frozen=True)
class Partition:
    precision: str
    context: int
    slots: int
    stages: list[Stage]
    ranks: list[RankInfo]  # indexed by global rank
    memory_per_device: list[MemoryUse]  # indexed by global rank
    fits: bool
    problems: list[str]
    suggestions: list[str]
    predicted: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "context": self.context,
            "slots": self.slots,
            "stages": [
                {"index": s.index, "layers": list(s.layers), "host": s.host, "ranks": s.ranks, "plan": s.plan.to_dict()}
                for s in self.stages
            ],
            "ranks": [
                {"rank": r.rank, "device": asdict(r.device), "stage": r.stage, "local_rank": r.local_rank}
                for r in self.ranks
            ],
            "memory_per_device": [asdict(m) for m in self.memory_per_device],
            "fits": self.fits,
            "problems": self.problems,
            "suggestions": self.suggestions,
            "predicted": self.predicted,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def engine_plan(self) -> Plan:
        """The plan the engine runs: each stage's shards under their global rank numbers."""
        ranks = [replace(s.plan.ranks[local], rank=g, stage=s.index)
                 for s in self.stages for local, g in enumerate(s.ranks)]
        return Plan(shares=[r.device.bandwidth_gb_s for r in self.ranks], ranks=ranks,
                    stages=[StageSpan(s.layers, list(s.ranks)) for s in self.stages],
                    kv_replicated=any(s.plan.kv_replicated for s in self.stages))

    @classmethod
    def from_dict(cls, d: dict) -> "Partition":
        stages = [
            Stage(s["index"], tuple(s["layers"]), s["host"], list(s["ranks"]), Plan.from_dict(s["plan"]))
            for s in d["stages"]
        ]
        ranks = [RankInfo(r["rank"], Device(**r["device"]), r["stage"], r["local_rank"]) for r in d["ranks"]]
        return cls(
            precision=d["precision"], context=d["context"], slots=d["slots"], stages=stages, ranks=ranks,
            memory_per_device=[MemoryUse(**m) for m in d["memory_per_device"]], fits=d["fits"],
            problems=list(d["problems"]), suggestions=list(d["suggestions"]), predicted=d["predicted"],
        )

    @classmethod
    def from_json(cls, text: str) -> "Partition":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- shape: stages and shards


def group_by_host(devices: list[Device]) -> list[list[Device]]:
    """Devices grouped by host, hosts in order of first appearance, devices in given order."""
    groups: dict[str, list[Device]] = {}
    for d in devices:
        groups.setdefault(d.host, []).append(d)
    return list(groups.values())


def stage_groups(devices: list[Device], force_stages: int | None) -> list[list[Device]]:
    by_host = group_by_host(devices)
    if force_stages is None or force_stages == len(by_host):
        return by_host
    if not 1 <= force_stages <= len(devices):
        raise BadPlan(f"force_stages must be between 1 and the {len(devices)} devices, got {force_stages}")
    ordered = [d for group in by_host for d in group]
    return [ordered[a:b] for a, b in contiguous_ranges(apportion(len(ordered), [1.0] * force_stages))]


def stage_host(group: list[Device]) -> str:
    return "+".join(dict.fromkeys(d.host for d in group))


def build_stages(cfg: ModelConfig, groups: list[list[Device]]) -> tuple[list[Stage], list[RankInfo]]:
    if len(groups) > cfg.num_layers:
        raise BadPlan(f"{len(groups)} pipeline stages but the model has only {cfg.num_layers} layers")
    stage_bw = [sum(d.bandwidth_gb_s for d in g) for g in groups]
    layer_ranges = contiguous_ranges(apportion(cfg.num_layers, stage_bw))
    stages, ranks = [], []
    for i, (group, layers) in enumerate(zip(groups, layer_ranges)):
        plan = make_plan(cfg, [d.bandwidth_gb_s for d in group])  # raises BadPlan past num_heads ranks
        ids = list(range(len(ranks), len(ranks) + len(group)))
        ranks += [RankInfo(rank=g, device=d, stage=i, local_rank=j) for j, (g, d) in enumerate(zip(ids, group))]
        stages.append(Stage(index=i, layers=layers, host=stage_host(group), ranks=ids, plan=plan))
    return stages, ranks


# ---------------------------------------------------------------- memory


def layer_params(cfg: ModelConfig, shard: RankShard, experts: int) -> int:
    """Parameters of one layer on this rank, with `experts` copies of the MLP (memory.py's arithmetic)."""
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv, cols = len(shard.q_heads), len(shard.kv_heads), shard.num_mlp_columns
    attn = (q + 2 * kv) * D * H + H * q * D + ((q + 2 * kv) * D if cfg.qkv_bias else 0) + (H if cfg.o_bias else 0)
    mlp = 3 * cols * H + ((2 * cols + H) if cfg.mlp_bias else 0)
    router = experts * H if experts > 1 else 0
    return attn + experts * mlp + router + 2 * H  # 2 RMS norms


def vocab_params(cfg: ModelConfig, stage: Stage, shard: RankShard, last: int, *, read: bool) -> int:
    """Embedding rows on the first stage, LM-head rows and final norm on the last; `read`: per token."""
    H, rows = cfg.hidden_size, shard.num_vocab_rows
    first_stage, last_stage = stage.index == 0, stage.index == last
    embed = rows * H if first_stage and not read else 0
    shared = cfg.tie_word_embeddings and first_stage and not read
    head = (0 if shared else rows * H) + H if last_stage else 0
    return embed + head


def rank_params(cfg: ModelConfig, stage: Stage, shard: RankShard, last: int, moe: MoE, *, read: bool) -> int:
    experts = moe.active_experts if read else moe.num_experts
    return stage.num_layers * layer_params(cfg, shard, experts) + vocab_params(cfg, stage, shard, last, read=read)


def activation_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def memory_use(
    cfg: ModelConfig, stage: Stage, shard: RankShard, device: Device, last: int, moe: MoE,
    precision: str, context: int, slots: int, prompt_tokens: int,
) -> MemoryUse:
    act = activation_bytes(precision)
    weights = rank_params(cfg, stage, shard, last, moe, read=False) * BYTES_PER_PARAM[precision]
    window = min(context, cfg.sliding_window) if cfg.sliding_window else context
    kv = 2 * stage.num_layers * slots * len(shard.kv_heads) * window * cfg.head_dim * act
    q, nkv, D = len(shard.q_heads), len(shard.kv_heads), cfg.head_dim
    tokens = max(prompt_tokens, slots)
    activations = tokens * (cfg.hidden_size + (q + 2 * nkv) * D + 2 * shard.num_mlp_columns) * act
    activations += tokens * shard.num_vocab_rows * 4 if stage.index == last else 0
    headroom = 0.5 * GB + 0.05 * device.memory_gb * GB
    parts = [weights / GB, kv / GB, activations / GB, headroom / GB]
    return MemoryUse(*parts, total_gb=sum(parts), capacity_gb=float(device.memory_gb))


# ---------------------------------------------------------------- prediction


def allreduce_s(n: int, hidden_bytes: int, link: Link) -> float:
    if n == 1:
        return 0.0
    latency = link.latency_us if link.allreduce_latency_us is None else link.allreduce_latency_us
    return 2 * (n - 1) / n * hidden_bytes / (link.bandwidth_gb_s * GB) + 2 * (n - 1) * latency * 1e-6


def driver_s(cfg: ModelConfig, stages: list[Stage], links: list[Link]) -> tuple[float, str, int]:
    """Per step, the driver (rank 0, first stage) broadcasts the step header and payload to every rank
    and collects the fp32 logits of the last stage: (seconds, link kind, logits bytes on the wire)."""
    hosts = list(dict.fromkeys(h for s in stages for h in s.hosts))
    if sum(len(s.ranks) for s in stages) == 1:
        return 0.0, "", 0
    control = 2 * max(link_between(stages[0].hosts[0], h, links).latency_us for h in hosts) * 1e-6
    last = stages[-1]
    if len(stages) == 1:  # gathered from the stage's ranks; rank 0's own rows stay put
        share = last.plan.ranks[0].num_vocab_rows / cfg.vocab_size
        link, logits = slowest_link(last.hosts, links), round(cfg.vocab_size * 4 * (1 - share))
    else:
        link, logits = link_between(last.hosts[-1], stages[0].hosts[0], links), cfg.vocab_size * 4
    return control + logits / (link.bandwidth_gb_s * GB) + link.latency_us * 1e-6, link.kind, logits


def pipeline_link(a: Stage, b: Stage, links: list[Link]) -> Link:
    return link_between(a.hosts[-1], b.hosts[0], links)


def predict(
    cfg: ModelConfig, stages: list[Stage], ranks: list[RankInfo], links: list[Link], moe: MoE,
    precision: str, prompt_tokens: int,
) -> dict:
    hidden_bytes = cfg.hidden_size * activation_bytes(precision)
    last = len(stages) - 1
    decode_s, ttft_s, wire = 0.0, 0.0, {}
    for s in stages:
        devs = [ranks[g].device for g in s.ranks]
        read = [rank_params(cfg, s, sh, last, moe, read=True) * BYTES_PER_PARAM[precision] for sh in s.plan.ranks]
        n, link = len(devs), slowest_link(s.hosts, links)
        decode_s += max(b / (d.bandwidth_gb_s * GB) for b, d in zip(read, devs))
        decode_s += 2 * s.num_layers * allreduce_s(n, hidden_bytes, link)
        flops = [prompt_tokens * 2 * rank_params(cfg, s, sh, last, moe, read=True) for sh in s.plan.ranks]
        ttft_s += max(f / (d.tflops * 1e12) for f, d in zip(flops, devs))
        if n > 1:
            wire[f"stage{s.index}:allreduce({link.kind})"] = round(2 * s.num_layers * 2 * (n - 1) * hidden_bytes)
    for a, b in pairwise(stages):
        link = pipeline_link(a, b, links)
        decode_s += hidden_bytes / (link.bandwidth_gb_s * GB) + link.latency_us * 1e-6
        ttft_s += prompt_tokens * hidden_bytes / (link.bandwidth_gb_s * GB) + link.latency_us * 1e-6
        wire[f"stage{a.index}->stage{b.index}({link.kind})"] = hidden_bytes
    driver, kind, logits = driver_s(cfg, stages, links)
    decode_s, ttft_s = decode_s + driver, ttft_s + driver
    if logits:
        wire[f"stage{last}->driver({kind})"] = logits
    return {"tokens_per_s": 1.0 / decode_s, "ttft_s": ttft_s, "decode_s": decode_s, "bytes_per_token": wire}


# ---------------------------------------------------------------- the planner


@dataclass(frozen=True)
class Request:
    """Everything a plan depends on besides the devices, so suggestions can re-plan with one change."""

    model: ModelConfig
    links: list[Link]
    precision: str
    context: int
    slots: int
    prompt_tokens: int
    force_stages: int | None
    moe: MoE


def check_inputs(devices: list[Device], r: Request) -> None:
    if not devices:
        raise BadPlan("no devices to plan for")
    if r.precision not in BYTES_PER_PARAM:
        raise BadPlan(f"unknown precision {r.precision!r}; known: {', '.join(BYTES_PER_PARAM)}")
    if r.context < 1 or r.slots < 1 or r.prompt_tokens < 1:
        raise BadPlan("context, slots and prompt_tokens must be at least 1")
    bad = [d for d in devices if not (d.memory_gb > 0 and d.bandwidth_gb_s > 0 and d.tflops > 0)]
    if bad:
        raise BadPlan(f"device {bad[0]} needs positive memory, bandwidth and tflops")


def problems_of(ranks: list[RankInfo], memory: list[MemoryUse]) -> list[str]:
    return [
        f"rank {r.rank} ({r.device.host} {r.device.kind}) needs {m.total_gb:.1f} GB but has "
        f"{m.capacity_gb:g} GB: short by {m.short_gb:.1f} GB"
        for r, m in zip(ranks, memory)
        if m.short_gb > 0
    ]


def layout(devices: list[Device], r: Request) -> Partition:
    """The partition and its memory and prediction, without suggestions."""
    check_inputs(devices, r)
    stages, ranks = build_stages(r.model, stage_groups(devices, r.force_stages))
    last = len(stages) - 1
    memory = [
        memory_use(r.model, stages[ri.stage], stages[ri.stage].plan.ranks[ri.local_rank], ri.device, last, r.moe,
                   r.precision, r.context, r.slots, r.prompt_tokens)
        for ri in ranks
    ]
    problems = problems_of(ranks, memory)
    predicted = predict(r.model, stages, ranks, r.links, r.moe, r.precision, r.prompt_tokens)
    return Partition(r.precision, r.context, r.slots, stages, ranks, memory, not problems, problems, [], predicted)


def fits_with(devices: list[Device], r: Request) -> bool:
    try:
        return layout(devices, r).fits
    except BadPlan:  # the change itself is impossible (say, more ranks than heads): not a suggestion
        return False


def suggest(devices: list[Device], r: Request, p: Partition) -> list[str]:
    """Single changes that would make it fit, each checked by re-planning with it."""
    out = []
    smaller = [x for x in SMALLER_PRECISIONS if BYTES_PER_PARAM[x] < BYTES_PER_PARAM[r.precision]]
    out += [f"{x} weights would fit" for x in smaller if fits_with(devices, replace(r, precision=x))]
    context = r.context // 2
    while context >= 256:
        if fits_with(devices, replace(r, context=context)):
            out.append(f"context {context} would fit")
            break
        context //= 2
    if r.slots > 1:
        slots = next((s for s in range(r.slots - 1, 0, -1) if fits_with(devices, replace(r, slots=s))), None)
        out += [f"{slots} slots would fit"] if slots else []
    out += more_devices(devices, r, p)
    return out


def more_devices(devices: list[Device], r: Request, p: Partition, most: int = 8) -> list[str]:
    """Add copies of the shortest device, on its host, until it fits (at most `most`)."""
    worst = max(range(len(p.ranks)), key=lambda g: (p.memory_per_device[g].short_gb, -g))
    like = p.ranks[worst].device
    for k in range(1, most + 1):
        if fits_with(devices + [like] * k, r):
            count, gpus = ("one", "GPU") if k == 1 else (str(k), "GPUs")
            return [f"{count} more {like.memory_gb:g} GB {gpus} ({like.kind}) on {like.host} would fit"]
    return []


def plan_partition(
    model: ModelConfig,
    devices: list[Device],
    links: list[Link] | None = None,
    precision: str = "bf16",
    context: int = 8192,
    slots: int = 1,
    prompt_tokens: int = 512,
    force_stages: int | None = None,
    moe: MoE | None = None,
) -> Partition:
    """Plan stages and shards; a model too big is reported (fits=False), never raised."""
    r = Request(model, list(links or []), precision, context, slots, prompt_tokens, force_stages, moe or moe_of(model))
    p = layout(list(devices), r)
    if p.fits:
        return p
    return replace(p, suggestions=suggest(list(devices), r, p))


# ---------------------------------------------------------------- plan files


def load_plan(text: str, cfg: ModelConfig, source: str = "the plan", column_unit: int = 1) -> Plan:
    """The engine plan in a JSON text: `llmd plan --json` output (a Partition), `llmd generate --json`
    output (its "plan"), or a bare Plan; checked against the model before any process starts."""
    try:
        d = json.loads(text)
        if "predicted" in d and "memory_per_device" in d:
            partition = Partition.from_dict(d)
            if not partition.fits:
                raise BadPlan(f"{source} does not fit its devices: {'; '.join(partition.problems)}")
            plan = partition.engine_plan()
        else:
            plan = Plan.from_dict(d["plan"] if "plan" in d and "ranks" not in d else d)
        check_plan(plan, cfg, column_unit)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
        raise BadPlan(f"{source} is not a plan from `llmd plan --json` ({type(e).__name__}: {e})") from None
    return plan


# ---------------------------------------------------------------- text


def compact(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": long head lists would break the table."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def describe(p: Partition) -> str:
    header = f"{'rank':>4}  {'host':<12} {'kind':<10} {'stage':>5}  {'layers':<9} {'KV groups':<11} {'memory GB':>15}"
    rows = [header, "-" * len(header)]
    for ri, m in zip(p.ranks, p.memory_per_device):
        stage = p.stages[ri.stage]
        shard = stage.plan.ranks[ri.local_rank]
        layers = f"{stage.layers[0]}-{stage.layers[1] - 1}"
        kv = compact(shard.kv_heads) + ("*" if stage.plan.kv_replicated else "")
        used = f"{m.total_gb:.1f}/{m.capacity_gb:g}" + (" !" if m.short_gb > 0 else "")
        where = f"{ri.rank:>4}  {ri.device.host:<12} {ri.device.kind:<10} {ri.stage:>5}"
        rows.append(f"{where}  {layers:<9} {kv:<11} {used:>15}")
    if any(s.plan.kv_replicated for s in p.stages):
        rows.append("* KV heads replicated: query heads are split instead")
    pred = p.predicted
    rows.append("")
    rows.append(f"precision {p.precision}, context {p.context}, slots {p.slots}, {len(p.stages)} stage(s)")
    rows.append(f"predicted: {pred['tokens_per_s']:.1f} tokens/s, time to first token {pred['ttft_s']:.2f} s")
    for name, b in pred["bytes_per_token"].items():
        rows.append(f"  {name}: {b} bytes/token")
    if not p.fits:
        rows.append("does not fit:")
        rows += [f"  {x}" for x in p.problems]
        rows += ["suggestions:"] + [f"  {x}" for x in p.suggestions] if p.suggestions else ["no single change found"]
    return "\n".join(rows)
