"""The balancer's decision: from measured step times and the current plan, a new plan or none.

Pure functions over plain data, and `Policy`, which holds what the decisions remember from check
to check (when to check, how long an imbalance has lasted, each rank's past measurements); the
loop that gathers times and applies moves is `engine/runtime.py`'s `Rebalancer`.

Inside each pipeline stage, a rank's step time is modelled from the weight bytes it reads
(decode is memory-bound): at first in proportion (the new shares are then proportional to
measured speed), and once a move has changed its bytes, as the line through its last two
measurements, which also captures the part of a step that moving bytes does not change. The
new shares equalise the modelled times. A move shifts at most `max_groups` KV groups (query
heads where KV heads are replicated) and at most `max_fraction` of the stage's MLP columns and
vocabulary rows, so one event stays small and the next check sees its effect.

Against oscillation: a stage is only rebalanced when it has been off by more than `threshold`,
with the same ranks above its mean, for `patience` steps (hysteresis: with the caller's
16-step windows, two disjoint windows must agree, so a burst of noise on a shared machine is
not taken for a slow device), no sooner than `min_interval` steps after the last move, and
only when the move is predicted to shrink the spread by more than `threshold` (a move that
would not clearly help is noise-chasing, and every move disturbs the steps it overlaps).
"""

from dataclasses import dataclass, field, replace

from .config import ModelConfig
from .errors import BadPlan
from .memory import shard_weight_bytes
from .plan import Plan, RankShard, StageSpan, apportion, contiguous_ranges


WINDOW_STEPS = 16  # the steps of the current plan a rank's time is judged on (their median)


@dataclass(frozen=True)
class BalancerConfig:
    threshold: float = 0.10  # a rank off its stage's mean step time by more than this is unbalanced
    check_every: int = 4  # steps between two gathers of the ranks' times
    min_interval: int = 8  # steps after a move before the next may start
    patience: int = 16  # steps an imbalance must persist (the same ranks slow) before a move
    max_groups: int = 1  # KV groups moved per event
    max_fraction: float = 0.5  # of a stage's MLP columns (and vocabulary rows) moved per event
    column_unit: int = 1  # MLP columns move in multiples of it (whole int4 groups)

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise BadPlan(f"the balance threshold must be between 0 and 1, got {self.threshold}")
        if self.check_every < 1 or self.max_groups < 1:
            raise BadPlan("the check interval and max groups must be at least 1")
        if self.min_interval < 0 or self.patience < 0:
            raise BadPlan("the minimum interval and patience cannot be negative")
        if not 0 < self.max_fraction <= 1:
            raise BadPlan(f"max_fraction must be in (0, 1], got {self.max_fraction}")


@dataclass(frozen=True)
class Move:
    stage: int
    plan: Plan  # the next epoch's plan
    from_rank: int  # the slowest rank, which gives
    to_rank: int  # the fastest, which takes
    kv_groups: list[int]  # KV groups (or, replicated, query heads) that change owner
    mlp_columns: int  # columns that change owner, all ranks together
    reason: str


def spread(times: list[float]) -> float:
    """Largest relative distance of a time from the mean."""
    mean = sum(times) / len(times)
    return max(abs(t - mean) for t in times) / mean if mean > 0 else 0.0


@dataclass(frozen=True)
class TimeModel:
    """A rank's step time as fixed + per_byte * (weight bytes it reads); fixed is 0 until two plans
    with different shares have been measured (then the line through them). A negative fixed part
    is a device faster than linear in the bytes (a cache that holds part of a small shard): taken
    as measured, or shares in proportion to speed would overshoot and swing back for ever."""

    fixed: float
    per_byte: float

    def time(self, nbytes: float) -> float:
        return self.fixed + self.per_byte * nbytes

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> "TimeModel":
        """From (bytes, ms) points, newest last: the line through the newest two with different bytes."""
        (b1, t1) = points[-1]
        older = [(b, t) for b, t in points[:-1] if abs(b - b1) > 0.02 * b1]
        if older:
            b0, t0 = older[-1]
            slope = (t1 - t0) / (b1 - b0)
            if slope > 0:  # more bytes, more time; a negative fixed part is a cache that holds part of the shard
                return cls(t1 - slope * b1, slope)
        return cls(0.0, t1 / b1)


def equal_time_shares(models: list[TimeModel], total: float) -> list[float]:
    """Shares of `total` bytes that give every rank the same predicted time (none below 1%)."""
    inverse = sum(1 / m.per_byte for m in models)
    level = (total + sum(m.fixed / m.per_byte for m in models)) / inverse
    nbytes = [max((level - m.fixed) / m.per_byte, 0.01 * total) for m in models]
    return [b / sum(nbytes) for b in nbytes]


def decide(plan: Plan, cfg: ModelConfig, step_ms: list[float], bc: BalancerConfig, unbalanced_steps: int,
           steps_since_move: int, history: dict[int, list[tuple[float, float]]] | None = None) -> Move | None:
    """A move for the first stage that needs one, or None. `unbalanced_steps` is how long the
    imbalance seen now has lasted (see `Persistence`); `history[rank]` holds earlier (weight bytes,
    step ms) measurements, oldest first."""
    for index, stage in enumerate(plan.stages):
        if len(stage.ranks) < 2:
            continue  # one rank: nothing to share with
        times = [step_ms[r] for r in stage.ranks]
        if min(times) <= 0:
            continue  # no measurement yet
        if spread(times) <= bc.threshold:
            continue  # balanced within the threshold
        if unbalanced_steps < bc.patience or steps_since_move < bc.min_interval:
            return None  # hysteresis: let it persist, and let the last move settle
        move = plan_move(plan, cfg, index, times, bc, history or {})
        if move is not None:
            return move
    return None


def imbalance(plan: Plan, step_ms: list[float], bc: BalancerConfig) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(stage, its ranks slower than the stage's mean) of every stage off by more than the threshold:
    what must stay the same from check to check for an imbalance to count as lasting. The ranks
    above the mean, not the slowest alone: when two ranks are equally slow, which of them is the
    slowest flips with the noise, yet the imbalance is one and lasting."""
    out = []
    for index, stage in enumerate(plan.stages):
        times = [step_ms[r] for r in stage.ranks]
        if len(times) > 1 and spread(times) > bc.threshold:
            mean = sum(times) / len(times)
            out.append((index, tuple(r for r, t in zip(stage.ranks, times) if t > mean)))
    return tuple(out)


@dataclass
class Persistence:
    """How long the imbalance seen at a check has lasted: the same stages off, with the same ranks
    above their stage's mean, at every check since it was first seen (checks while a move is
    prepared and the new plan's first window are not judged: a move that leaves the same ranks
    slow continues the imbalance it was made for)."""

    seen: tuple = ()
    since: int = 0  # the step it was first seen

    def lasted(self, seen: tuple, step: int) -> int:
        if seen != self.seen:
            self.seen, self.since = seen, step
        return step - self.since if seen else 0


def plan_move(plan: Plan, cfg: ModelConfig, index: int, times: list[float], bc: BalancerConfig,
              history: dict[int, list[tuple[float, float]]]) -> Move | None:
    stage = plan.stages[index]
    work = [shard_weight_bytes(cfg, plan, r) for r in stage.ranks]
    models = [TimeModel.fit(history.get(r, []) + [(w, t)]) for r, w, t in zip(stage.ranks, work, times)]
    target = equal_time_shares(models, sum(work))  # with no history: in proportion to measured speed
    slow, fast = max(range(len(times)), key=lambda i: times[i]), min(range(len(times)), key=lambda i: times[i])
    shards = shifted_shards(plan, cfg, index, target, slow, fast, bc)
    new = replace_stage(plan, index, shards, target)
    predicted = [m.time(shard_weight_bytes(cfg, new, r)) for r, m in zip(stage.ranks, models)]
    if spread(predicted) > spread(times) - bc.threshold:
        return None  # would not clearly help (granularity or noise): not worth a migration's disruption
    moved = sorted(set(plan.ranks[stage.ranks[slow]].q_heads if plan.kv_replicated else
                       plan.ranks[stage.ranks[slow]].kv_heads) - set(shards[slow].q_heads if plan.kv_replicated
                                                                      else shards[slow].kv_heads))
    columns = sum(abs(a.num_mlp_columns - plan.ranks[r].num_mlp_columns) for a, r in zip(shards, stage.ranks)) // 2
    reason = (f"stage {index}: step ms {', '.join(f'r{r} {t:.1f}' for r, t in zip(stage.ranks, times))} "
              f"(spread {spread(times):.0%} > {bc.threshold:.0%}); predicted spread {spread(predicted):.0%}")
    return Move(index, new, stage.ranks[slow], stage.ranks[fast], moved, columns, reason)


def shifted_shards(plan: Plan, cfg: ModelConfig, index: int, target: list[float], slow: int, fast: int,
                   bc: BalancerConfig) -> list[RankShard]:
    """The stage's shards after one bounded step towards `target` shares (local rank order)."""
    stage = plan.stages[index]
    old = [plan.ranks[r] for r in stage.ranks]
    heads = move_heads(old, cfg, slow, fast, target, bc.max_groups, plan.kv_replicated)
    u = bc.column_unit  # columns move in whole int4 groups
    cols = [c * u for c in bounded_counts([s.num_mlp_columns // u for s in old], target, cfg.intermediate_size // u,
                                          bc.max_fraction)]
    rows = bounded_counts([s.num_vocab_rows for s in old], target, cfg.vocab_size, bc.max_fraction)
    return [replace(s, q_heads=q, kv_heads=kv, mlp_columns=c, vocab_rows=v)
            for s, (q, kv), c, v in zip(old, heads, contiguous_ranges(cols), contiguous_ranges(rows))]


def move_heads(old: list[RankShard], cfg: ModelConfig, slow: int, fast: int, target: list[float],
               max_groups: int, replicated: bool) -> list[tuple[list[int], list[int]]]:
    """Move up to `max_groups` KV groups (replicated: that many groups' worth of query heads) from the
    slowest rank to the fastest, as far as the target shares ask for and the slow rank keeps one."""
    unit = 1 if replicated else cfg.group_size  # query heads per unit moved
    owned = [list(s.q_heads) for s in old]
    want = apportion(cfg.num_heads // unit, target)  # units each rank should own
    excess = len(owned[slow]) // unit - want[slow]
    count = max(0, min(max_groups * (cfg.group_size // unit), excess, len(owned[slow]) // unit - 1))
    for _ in range(count):
        moved, owned[slow] = owned[slow][-unit:], owned[slow][:-unit]  # the slow rank's last unit
        owned[fast] = sorted(owned[fast] + moved)
    return [(q, sorted({h // cfg.group_size for h in q})) for q in owned]


def bounded_counts(current: list[int], target: list[float], total: int, max_fraction: float) -> list[int]:
    """Counts per rank one step towards `target` shares of `total`: at most `max_fraction` of it changes owner."""
    delta = [w - c for w, c in zip(apportion(total, target), current)]
    moved, limit = sum(abs(d) for d in delta) // 2, max(1, int(total * max_fraction))
    if moved > limit:
        delta = [int(d * limit / moved) for d in delta]  # toward zero, so the total stays within the limit
        surplus = sum(delta)  # what truncation left unbalanced: taken from the biggest gainer or giver
        i = max(range(len(delta)), key=lambda j: delta[j]) if surplus > 0 else min(range(len(delta)), key=lambda j: delta[j])
        delta[i] -= surplus
    counts = [c + d for c, d in zip(current, delta)]
    return counts if min(counts) >= 1 else current  # a step that would empty a rank: keep the old split


def replace_stage(plan: Plan, index: int, shards: list[RankShard], target: list[float]) -> Plan:
    stage: StageSpan = plan.stages[index]
    ranks = list(plan.ranks)
    shares = list(plan.shares)
    total = sum(shares[r] for r in stage.ranks)
    for shard, t in zip(shards, target):
        ranks[shard.rank] = shard
        shares[shard.rank] = round(total * t, 6)
    return replace(plan, ranks=ranks, shares=shares, epoch=plan.epoch + 1)


def full(window_steps: list[int]) -> bool:
    """Whether every rank's window spans WINDOW_STEPS steps of the current plan."""
    return min(window_steps) >= WINDOW_STEPS


@dataclass
class Policy:
    """When to move, over time. The caller asks `due(step)` after every decode step; when it is
    due, the caller gathers each rank's window (median ms over its last steps of the current plan,
    and how many steps that is) and asks `check`. A move it returns is under way until the caller
    reports `switched` or `aborted`; meanwhile checks come every other step, to switch soon."""

    cfg: ModelConfig
    config: BalancerConfig = field(default_factory=BalancerConfig)
    persistence: Persistence = field(default_factory=Persistence)
    history: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # rank -> (weight bytes, ms)
    next_check: int = field(init=False)
    last_switch: int | None = None
    pending: bool = False

    def __post_init__(self):
        self.next_check = self.config.check_every

    def due(self, step: int) -> bool:
        if step < self.next_check:
            return False
        # While a move is prepared, ask every other step whether it is ready, so it switches soon.
        self.next_check = step + (min(2, self.config.check_every) if self.pending else self.config.check_every)
        return True

    def check(self, plan: Plan, step: int, window_ms: list[float], window_steps: list[int]) -> Move | None:
        """A move to start now, or None."""
        if not full(window_steps):
            return None  # a rank has run the current plan for less than a full window: too little to judge
        lasted = self.persistence.lasted(imbalance(plan, window_ms, self.config), step)
        since = step - self.last_switch if self.last_switch is not None else step + self.config.min_interval
        move = decide(plan, self.cfg, window_ms, self.config, lasted, since, self.history)
        self._remember(plan, window_ms)
        self.pending = move is not None
        return move

    def switched(self, step: int) -> None:
        self.pending, self.last_switch = False, step
        self.next_check = step + WINDOW_STEPS  # the new plan is judged on a full window of its own
        # Persistence is not reset: if the new plan's first full window still has the same ranks
        # slow, that is the imbalance the move was made for, already shown to last.

    def aborted(self) -> None:
        self.pending = False

    def _remember(self, plan: Plan, window_ms: list[float]) -> None:
        """Keep each rank's latest measurement under each plan it ran, for the time model."""
        for rank, ms in enumerate(window_ms):
            if ms <= 0:
                continue
            points = self.history.setdefault(rank, [])
            nbytes = float(shard_weight_bytes(self.cfg, plan, rank))
            if points and points[-1][0] == nbytes:
                points[-1] = (nbytes, ms)
            else:
                points.append((nbytes, ms))
            del points[:-4]
