"""Who holds what: the head-shard plan of one pipeline stage, as plain data.

A rank owns a list of KV groups (a KV head and its query heads), a range of MLP
intermediate columns and a range of vocabulary rows (embedding and LM head).
Where ranks outnumber KV heads, query heads are split instead and each rank
keeps a replica of the KV heads its query heads read.
"""

import json
import math
from dataclasses import dataclass, field, replace

from .config import ModelConfig
from .errors import BadPlan


@dataclass(frozen=True)
class RankShard:
    rank: int
    kv_heads: list[int]
    q_heads: list[int]
    mlp_columns: tuple[int, int]  # [start, end) of the intermediate dimension
    vocab_rows: tuple[int, int]  # [start, end) of the vocabulary, split among the ranks of its stage
    stage: int = 0

    @property
    def num_mlp_columns(self) -> int:
        return self.mlp_columns[1] - self.mlp_columns[0]

    @property
    def num_vocab_rows(self) -> int:
        return self.vocab_rows[1] - self.vocab_rows[0]


@dataclass(frozen=True)
class StageSpan:
    """A pipeline stage: a contiguous range of layers, head-sharded over its ranks."""

    layers: tuple[int, int]  # [start, end)
    ranks: list[int]

    @property
    def leader(self) -> int:
        return self.ranks[0]


@dataclass(frozen=True)
class Plan:
    shares: list[float]
    ranks: list[RankShard]
    stages: list[StageSpan]
    epoch: int = 0
    kv_replicated: bool = field(default=False)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def stage_of(self, rank: int) -> StageSpan:
        return self.stages[self.ranks[rank].stage]

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "shares": self.shares,
            "epoch": self.epoch,
            "kv_replicated": self.kv_replicated,
            "stages": [{"layers": list(st.layers), "ranks": st.ranks} for st in self.stages],
            "ranks": [
                {
                    "rank": r.rank,
                    "kv_groups": r.kv_heads,
                    "q_heads": r.q_heads,
                    "mlp_columns": list(r.mlp_columns),
                    "vocab_rows": list(r.vocab_rows),
                    "stage": r.stage,
                }
                for r in self.ranks
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        ranks = [
            RankShard(
                rank=r["rank"],
                kv_heads=list(r["kv_groups"]),
                q_heads=list(r["q_heads"]),
                mlp_columns=tuple(r["mlp_columns"]),
                vocab_rows=tuple(r["vocab_rows"]),
                stage=r.get("stage", 0),
            )
            for r in d["ranks"]
        ]
        stages = [StageSpan(tuple(st["layers"]), list(st["ranks"])) for st in d["stages"]]
        return cls(shares=list(d["shares"]), ranks=ranks, stages=stages, epoch=d["epoch"],
                   kv_replicated=d["kv_replicated"])

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def parse_shares(text: str | None, world_size: int) -> list[float]:
    """`"2,1"` -> [2.0, 1.0]; None -> even shares."""
    if not text:
        return [1.0] * world_size
    try:
        shares = [float(s) for s in text.split(",")]
    except ValueError:
        raise BadPlan(f"--shares must be numbers separated by commas, got {text!r}") from None
    if len(shares) != world_size:
        raise BadPlan(f"--shares has {len(shares)} values but there are {world_size} workers")
    if any(not (0 < s < math.inf) for s in shares) or not math.isfinite(sum(shares)):
        raise BadPlan(f"every share must be a positive finite number, got {text!r}")
    return shares


def apportion(total: int, shares: list[float]) -> list[int]:
    """Split `total` units in proportion to `shares`, at least one each (largest remainder)."""
    n = len(shares)
    if total < n:
        raise BadPlan(f"cannot give {n} ranks at least one of {total} units")
    spare = total - n
    quotas = [spare * s / sum(shares) for s in shares]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(n), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: spare - sum(counts)]:
        counts[i] += 1
    return [c + 1 for c in counts]


def contiguous_ranges(counts: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def make_plan(cfg: ModelConfig, shares: list[float], column_unit: int = 1) -> Plan:
    """`column_unit`: MLP columns go to ranks in multiples of it (whole int4 groups, engine/quant.py)."""
    n = len(shares)
    if n > cfg.num_heads:
        raise BadPlan(f"{n} workers but the model has only {cfg.num_heads} query heads; use at most {cfg.num_heads}")
    replicated = n > cfg.num_kv_heads
    if replicated:
        q_ranges = contiguous_ranges(apportion(cfg.num_heads, shares))
        q_heads = [list(range(a, b)) for a, b in q_ranges]
        kv_heads = [sorted({q // cfg.group_size for q in qs}) for qs in q_heads]
    else:
        kv_ranges = contiguous_ranges(apportion(cfg.num_kv_heads, shares))
        kv_heads = [list(range(a, b)) for a, b in kv_ranges]
        g = cfg.group_size
        q_heads = [list(range(a * g, b * g)) for a, b in kv_ranges]
    mlp = contiguous_ranges(mlp_counts(cfg, q_heads, kv_heads, shares, column_unit))
    vocab = contiguous_ranges(apportion(cfg.vocab_size, shares))
    ranks = [RankShard(r, kv_heads[r], q_heads[r], mlp[r], vocab[r]) for r in range(n)]
    stages = [StageSpan((0, cfg.num_layers), list(range(n)))]
    return Plan(shares=list(shares), ranks=ranks, stages=stages, kv_replicated=replicated)


def attention_params(cfg: ModelConfig, q_heads: list[int], kv_heads: list[int]) -> int:
    """One layer's attention weights on a rank: its q/k/v rows and o_proj columns."""
    return (len(q_heads) + 2 * len(kv_heads)) * cfg.head_dim * cfg.hidden_size + cfg.hidden_size * len(q_heads) * cfg.head_dim


def mlp_counts(cfg: ModelConfig, q_heads: list[list[int]], kv_heads: list[list[int]], shares: list[float],
               unit: int = 1) -> list[int]:
    """MLP columns per rank so that each rank's layer weights (heads plus columns) follow its share: heads
    come in coarse units (9 heads over 2 ranks is 6 + 3), and the fine column split evens that out.
    Decode reads every weight once per token, so equal bytes per unit of speed is equal time."""
    per_column = 3 * cfg.hidden_size  # a gate row, an up row and a down column
    attention = [attention_params(cfg, q, kv) for q, kv in zip(q_heads, kv_heads)]
    total = sum(attention) + cfg.intermediate_size * per_column
    ideal = [max(s / sum(shares) * total - a, per_column) for s, a in zip(shares, attention)]
    return [c * unit for c in apportion(cfg.intermediate_size // unit, ideal)]


def make_pipeline_plan(cfg: ModelConfig, shares: list[float], num_stages: int, column_unit: int = 1) -> Plan:
    """Ranks in `num_stages` contiguous stages (as even as can be); layers split by each stage's
    total share; head-shard inside each stage by the ranks' own shares."""
    n = len(shares)
    if not 1 <= num_stages <= min(n, cfg.num_layers):
        raise BadPlan(f"--stages must be between 1 and {min(n, cfg.num_layers)} for {n} workers")
    if num_stages == 1:
        return make_plan(cfg, shares, column_unit)
    rank_ranges = contiguous_ranges(apportion(n, [1.0] * num_stages))
    layer_ranges = contiguous_ranges(apportion(cfg.num_layers, [sum(shares[a:b]) for a, b in rank_ranges]))
    ranks, stages, replicated = [], [], False
    for index, ((a, b), layers) in enumerate(zip(rank_ranges, layer_ranges, strict=True)):
        local = make_plan(cfg, shares[a:b], column_unit)
        replicated |= local.kv_replicated
        ranks += [replace(r, rank=a + r.rank, stage=index) for r in local.ranks]
        stages.append(StageSpan(layers, list(range(a, b))))
    return Plan(shares=list(shares), ranks=ranks, stages=stages, kv_replicated=replicated)


def check_plan(plan: Plan, cfg: ModelConfig, column_unit: int = 1) -> None:
    """Raise BadPlan unless `plan` covers this model exactly: every layer in one stage, and inside each
    stage every query head, MLP column and vocabulary row on exactly one rank, with the KV heads they read;
    MLP columns cut at multiples of `column_unit` (whole int4 groups)."""
    check_types(plan)
    n = plan.world_size
    if [r.rank for r in plan.ranks] != list(range(n)):
        raise BadPlan(f"the plan's ranks must be numbered 0..{n - 1} in order")
    if not plan.stages or not is_tiling([st.layers for st in plan.stages], cfg.num_layers):
        raise BadPlan(f"the plan's stages must cover layers 0..{cfg.num_layers - 1} in order, each at least one")
    if sorted(r for st in plan.stages for r in st.ranks) != list(range(n)):
        raise BadPlan("every rank must be in exactly one stage")
    for index, st in enumerate(plan.stages):
        shards = [plan.ranks[r] for r in st.ranks]
        if any(s.stage != index for s in shards):
            raise BadPlan(f"stage {index} lists a rank that names another stage")
        check_stage_shards(shards, cfg, index)
    cuts = [c for r in plan.ranks for c in r.mlp_columns]
    if any(c % column_unit for c in cuts):
        raise BadPlan(f"MLP columns must be split at multiples of {column_unit} for these weights "
                      f"(int4 groups of {column_unit}); the plan cuts at {sorted(set(cuts))}")


def check_types(plan: Plan) -> None:
    """A plan read from JSON holds integers where it counts, so the checks below compare like with like."""
    def ints(*values) -> bool:
        return all(type(v) is int for v in values)

    if not ints(plan.epoch) or plan.epoch < 0 or type(plan.kv_replicated) is not bool:
        raise BadPlan("the plan's epoch must be an integer >= 0 and kv_replicated true or false")
    if len(plan.shares) != plan.world_size or not all(
            type(x) in (int, float) and math.isfinite(x) and x > 0 for x in plan.shares):
        raise BadPlan("the plan needs one positive share per rank")
    for r in plan.ranks:
        if not ints(r.rank, r.stage, *r.kv_heads, *r.q_heads, *r.mlp_columns, *r.vocab_rows):
            raise BadPlan(f"rank {r.rank}: heads, columns, rows and stage must be integers")
    for st in plan.stages:
        if not ints(*st.layers, *st.ranks):
            raise BadPlan("the plan's stages must hold integer layers and ranks")


def check_stage_shards(shards: list[RankShard], cfg: ModelConfig, index: int) -> None:
    where = f"stage {index}"
    if sorted(q for s in shards for q in s.q_heads) != list(range(cfg.num_heads)):
        raise BadPlan(f"{where}: every one of the {cfg.num_heads} query heads must be on exactly one rank")
    for s in shards:
        if sorted(s.kv_heads) != sorted({q // cfg.group_size for q in s.q_heads}):
            raise BadPlan(f"{where}: rank {s.rank} must hold exactly the KV heads its query heads read")
    for name, total in (("mlp_columns", cfg.intermediate_size), ("vocab_rows", cfg.vocab_size)):
        if not is_tiling([getattr(s, name) for s in shards], total):
            raise BadPlan(f"{where}: {name} must split [0, {total}) into contiguous non-empty ranges in rank order")


def is_tiling(spans: list[tuple[int, int]], total: int) -> bool:
    """Do these [start, end) ranges cover [0, total) in order, each non-empty and none overlapping?"""
    ends = [0] + [b for _, b in spans]
    return [a for a, _ in spans] == ends[:-1] and ends[-1] == total and all(a < b for a, b in spans)
