"""The step loop: the driver (rank 0) broadcasts each step, every rank runs it.

A step is a small header (op, rows, length, flags) and a payload (token ids,
KV slots, start positions), sent on the control group. Workers block on the
next header; the driver samples from the logits it gathers.
"""

import ctypes
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .balancer import BalancerConfig, Move, Policy, full
from .errors import PromptTooLong, WorkerLost
from .memory import shard_weight_bytes
from .migration import Migration
from .model import ShardedModel
from .plan import Plan
from .sampling import SamplingParams, sample

OP_FORWARD, OP_STATS, OP_CLEAR, OP_TIMES, OP_PREPARE, OP_SWITCH, OP_ABORT, OP_SHUTDOWN = 1, 2, 3, 4, 5, 6, 7, 9
FLAG_ALL_LOGITS, FLAG_UNCOUNTED = 1, 2  # OP_FORWARD's flags: every position's logits; not a timed step
STATS_FIELDS = 4  # per rank: peak RSS MiB, weights MiB, peak RSS MiB once its slices had loaded, RSS before
TIMES_FIELDS = 6  # per rank: window median ms and its steps, last-32 mean ms, migration status, KV bytes sent, steps


def peak_rss_mb() -> float:
    """This process's peak resident memory: the kernel's high-water mark (VmHWM), which starts afresh at
    exec, where ru_maxrss can carry the parent's peak into a child."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_WHILE_LOADING = 1 << 20
MAPPED_AFTER = 32 << 20  # the highest threshold glibc's own adjustment reaches on 64-bit machines


@contextmanager
def large_allocations_mapped():
    """While a rank loads, every allocation of 1 MiB or more gets pages of its own, returned on free.
    glibc otherwise raises its threshold after the first large free and serves later tensors from a heap
    that does not shrink: the loading peak moved between 180 and 450 MiB from run to run on the same slice,
    and held steady at the lower figure with the threshold fixed. Afterwards the threshold stays fixed at
    where glibc's own adjustment would end. A no-op where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MAPPED_WHILE_LOADING)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MAPPED_AFTER)


def reset_peak_rss() -> None:
    """Start this process's high-water mark afresh at its resident memory now (Linux 4.0+), so a peak read
    later measures what happened since, not an earlier moment (imports, a tokenizer) that has passed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), 0 where /proc is not there."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rank_stats(model: ShardedModel) -> torch.Tensor:
    before, peak = model.load_memory_mb
    return torch.tensor([peak_rss_mb(), model.w.nbytes() / 2**20, peak, before], dtype=torch.float64,
                        device=model.device)


class Rank:
    """What one rank runs for each broadcast step, and its balancer state between steps."""

    def __init__(self, model: ShardedModel):
        self.model = model
        self.migration: Migration | None = None
        self.sent_bytes = 0  # KV bytes this rank sent in migrations since the driver last asked

    def run(self, header: torch.Tensor, payload: torch.Tensor):
        """Execute one broadcast step on this rank; rank 0 gets the result."""
        op, B, S, flags = header.tolist()
        model = self.model
        if op == OP_FORWARD:
            tokens = payload[: B * S].view(B, S).to(model.device)
            slots = payload[B * S : B * S + B].tolist()
            starts = payload[B * S + B :].tolist()
            return model.forward(tokens, slots, starts, all_logits=bool(flags & FLAG_ALL_LOGITS),
                                 counted=not flags & FLAG_UNCOUNTED)
        if op == OP_STATS:
            return model.comm.gather_to_driver(rank_stats(model), [STATS_FIELDS] * model.comm.world_size)
        if op == OP_CLEAR:
            model.clear_slot(B)
            if self.migration:
                self.migration.slot_cleared(B)
            return None
        if op == OP_TIMES:
            return model.comm.gather_to_driver(self.times(reset_sent=not flags), [TIMES_FIELDS] * model.comm.world_size)
        if op == OP_PREPARE:
            plan = Plan.from_json(bytes(payload.tolist()).decode())
            self.migration = Migration(model, plan)
            return None
        if op == OP_SWITCH:
            self.sent_bytes += self.migration.switch()
            self.migration = None
            model.clock.window.clear()  # the times of a new plan start afresh
            return None
        if op == OP_ABORT:
            self.migration.thread.join()
            self.migration = None
            return None
        raise ValueError(f"unknown op {op}")

    def times(self, reset_sent: bool) -> torch.Tensor:
        clock = self.model.clock
        window = statistics.median(clock.window) * 1e3 if clock.window else 0.0
        recent = statistics.fmean(clock.recent) * 1e3 if clock.recent else 0.0
        status = self.migration.status if self.migration else 0
        row = torch.tensor([window, len(clock.window), recent, status, self.sent_bytes, clock.steps],
                           dtype=torch.float64, device=self.model.device)
        if reset_sent:  # the KV bytes are counted per event
            self.sent_bytes = 0
        return row


def serve(model: ShardedModel) -> None:
    """A worker's life: wait for a step, run it, until the driver says stop."""
    comm, rank = model.comm, Rank(model)
    while True:
        header = torch.empty(4, dtype=torch.int64)
        comm.broadcast_control(header)
        if header[0] == OP_SHUTDOWN:
            return
        payload = torch.empty(payload_size(header), dtype=torch.int64)
        comm.broadcast_control(payload)
        rank.run(header, payload)


def payload_size(header: torch.Tensor) -> int:
    op, B, S, _ = header.tolist()
    if op == OP_FORWARD:
        return B * S + 2 * B
    return B if op == OP_PREPARE else 1


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "length"
    prefill_logits: torch.Tensor | None = None  # [S, V] when recorded
    decode_logits: list[torch.Tensor] = field(default_factory=list)  # [V] per step when recorded
    decode_step_ms: list[float] = field(default_factory=list)  # per decode step, wall ms on the driver (balancer included)
    migrations: list[dict] = field(default_factory=list)  # the balancer's events during this generation
    rank_step_ms: list[float] = field(default_factory=list)  # per rank, mean compute ms of the last 32 steps

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; every later one from a decode step.
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class RankTimes:
    window_ms: float  # median compute ms per step over the last WINDOW_STEPS steps of the current plan
    window_steps: int  # how many steps that is (fewer just after a start or a switch)
    recent_ms: float  # mean compute ms of the last 32 steps
    migration: int  # 0 none or preparing, 1 ready to switch, 2 failed
    sent_bytes: int  # KV bytes sent in migrations since last asked
    steps: int


def check_prompt(prompt_ids: list[int], context: int, max_positions: int) -> None:
    """A prompt must leave the KV cache room for at least one new token."""
    if not prompt_ids:
        raise PromptTooLong("the prompt is empty")
    if len(prompt_ids) >= context:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the context holds {context} "
                            f"(raise --context, up to the model's {max_positions})")


class Driver:
    """Rank 0: owns a shard like every rank, and drives the others."""

    def __init__(self, model: ShardedModel, check_workers: Callable[[], None] = lambda: None,
                 balancer: BalancerConfig | None = None):
        self.model, self.comm = model, model.comm
        self.rank = Rank(model)
        # Raises WorkerLost naming the rank that exited; asked after a collective fails,
        # since a dead peer breaks gloo's sockets (or the shared-memory wait) at once.
        self.check_workers = check_workers
        self.rebalancer = Rebalancer(self, balancer) if balancer else None

    @property
    def plan(self) -> Plan:
        return self.model.plan

    def _step(self, op: int, B: int, S: int, flags: int, payload: list[int]):
        header = torch.tensor([op, B, S, flags], dtype=torch.int64)
        payload_t = torch.tensor(payload or [0], dtype=torch.int64)
        try:
            self.comm.broadcast_control(header)
            self.comm.broadcast_control(payload_t)
            return self.rank.run(header, payload_t)
        except (RuntimeError, WorkerLost) as e:  # a peer closed its socket, timed out or vanished
            self._name_the_lost_worker()
            raise WorkerLost(f"a worker stopped answering: {str(e).splitlines()[0]}") from None

    def _name_the_lost_worker(self, wait_s: float = 3.0) -> None:
        """Raise WorkerLost naming the worker and its exit code, when we started it. A worker that
        failed closes its sockets while it exits, so give it a moment to be seen gone."""
        deadline = time.monotonic() + wait_s
        while True:
            self.check_workers()
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def forward(self, tokens: list[list[int]], slots: list[int], starts: list[int], all_logits: bool = False,
                counted: bool = True):
        B, S = len(tokens), len(tokens[0])
        flat = [t for row in tokens for t in row]
        flags = (FLAG_ALL_LOGITS if all_logits else 0) | (0 if counted else FLAG_UNCOUNTED)
        return self._step(OP_FORWARD, B, S, flags, flat + list(slots) + list(starts))

    def warm_up(self, slot: int = 0) -> None:
        """One decode step on a scratch slot, so compilation happens at start, not in the first reply."""
        self.forward([[0]], [slot], [0], counted=False)
        self.clear_slot(slot)

    def stats(self) -> list[dict]:
        table = self._step(OP_STATS, 0, 0, 0, []).view(-1, STATS_FIELDS).cpu()
        return [{"rank": r, "peak_rss_mb": round(float(a), 1), "weights_mb": round(float(b), 1),
                 "loaded_peak_rss_mb": round(float(c), 1), "rss_before_load_mb": round(float(d), 1)}
                for r, (a, b, c, d) in enumerate(table.tolist())]

    def times(self, reset_sent: bool = True) -> list[RankTimes]:
        """Every rank's compute times (without collective waits) and migration state; `reset_sent`
        starts the ranks' count of KV bytes sent afresh."""
        table = self._step(OP_TIMES, 0, 0, 0 if reset_sent else 1, []).view(-1, TIMES_FIELDS).cpu().tolist()
        return [RankTimes(w, int(k), r, int(m), int(b), int(n)) for w, k, r, m, b, n in table]

    def prepare(self, plan: Plan) -> None:
        data = list(plan.to_json().encode())
        self._step(OP_PREPARE, len(data), 0, 0, data)

    def switch(self) -> None:
        self._step(OP_SWITCH, 0, 0, 0, [])

    def abort(self) -> None:
        self._step(OP_ABORT, 0, 0, 0, [])

    def clear_slot(self, slot: int) -> None:
        self._step(OP_CLEAR, slot, 0, 0, [])

    def shutdown(self) -> None:
        if self.rank.migration is not None:
            self.rank.migration.thread.join()  # every rank finishes its background transfers first
        self.comm.broadcast_control(torch.tensor([OP_SHUTDOWN, 0, 0, 0], dtype=torch.int64))

    def generate(self, prompt_ids: list[int], params: SamplingParams, slot: int = 0,
                 on_token: Callable[[int], None] | None = None, record_logits: bool = False,
                 should_stop: Callable[[], bool] = lambda: False) -> Generation:
        """Prefill, then decode until a stop token, the budget, or `should_stop()` (finish "cancelled")."""
        context = self.model.context
        check_prompt(prompt_ids, context, self.model.cfg.max_positions)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        out = Generation()
        budget = min(params.max_new_tokens, context - len(prompt_ids))
        if budget <= 0:
            return out
        first_event = len(self.rebalancer.events) if self.rebalancer else 0
        t0 = time.perf_counter()
        logits = self.forward([prompt_ids], [slot], [0], all_logits=record_logits)[0].cpu()  # [S, V] or [V]
        if record_logits:
            out.prefill_logits, logits = logits, logits[-1]
        out.prefill_s = time.perf_counter() - t0
        position = len(prompt_ids)
        t1 = time.perf_counter()
        while True:
            token = sample(logits, params, seen, generator)
            out.token_ids.append(token)
            if on_token:
                on_token(token)
            if token in params.stop_token_ids:
                out.finish_reason = "stop"
                break
            if len(out.token_ids) >= budget:
                break
            if should_stop():
                out.finish_reason = "cancelled"
                break
            seen = torch.cat([seen, torch.tensor([token])])
            step_start = time.perf_counter()
            logits = self.forward([[token]], [slot], [position])[0].cpu()  # [V]
            position += 1
            if record_logits:
                out.decode_logits.append(logits)
            if self.rebalancer:
                self.rebalancer.after_step()
            # What the reader sees between two tokens: the step and any balancer work after it.
            out.decode_step_ms.append((time.perf_counter() - step_start) * 1e3)
        out.decode_s = time.perf_counter() - t1
        self.clear_slot(slot)
        out.rank_step_ms = [round(t.recent_ms, 3) for t in self.times(reset_sent=False)]
        if self.rebalancer:
            self.rebalancer.finish_pending_reports()
            out.migrations = [dict(e) for e in self.rebalancer.events[first_event:]]
        return out


class Rebalancer:
    """The driver's balancer loop: when `Policy` says a check is due it gathers the ranks' times,
    starts the move the policy asks for (every rank prepares in the background), and switches
    every rank at the first check where all are ready. Each move becomes an event."""

    def __init__(self, driver: Driver, config: BalancerConfig):
        self.driver = driver
        self.policy = Policy(driver.model.cfg, config)
        self.steps = 0
        self.pending: tuple[Move, dict, float] | None = None
        self.events: list[dict] = []
        self._awaiting_after: list[dict] = []  # switched events whose step times after are not known yet
        self._kv_sent = 0  # KV bytes the ranks sent since the last event took them

    def after_step(self) -> None:
        self.steps += 1
        if not self.policy.due(self.steps):
            return
        times = self.driver.times()
        self._kv_sent += sum(t.sent_bytes for t in times)
        if self.pending:
            self._advance(times)
            return
        window, steps = [t.window_ms for t in times], [t.window_steps for t in times]
        if full(steps):
            self._report_after(window)
        move = self.policy.check(self.driver.plan, self.steps, window, steps)
        if move:
            self._start(move, window)

    def _start(self, move: Move, window: list[float]) -> None:
        old = self.driver.plan
        cfg = self.driver.model.cfg
        changed = [r for r in range(old.world_size) if old.ranks[r] != move.plan.ranks[r]]
        gained = sum(max(0, shard_weight_bytes(cfg, move.plan, r) - shard_weight_bytes(cfg, old, r))
                     for r in changed)
        event = {
            "time": time.time(), "step": self.steps, "switch_step": None, "epoch": move.plan.epoch, "stage": move.stage,
            "layers": list(old.stages[move.stage].layers), "kv_groups": move.kv_groups,
            "mlp_columns": move.mlp_columns, "from_rank": move.from_rank, "to_rank": move.to_rank,
            "reason": move.reason, "step_ms_before": [round(t, 3) for t in window], "step_ms_after": None,
            "shares_after": move.plan.shares, "weight_bytes_moved": gained,  # what the takers read from their checkpoints
            "kv_bytes": 0, "bytes_moved": gained, "duration_s": None, "status": "preparing",
        }
        self.driver.prepare(move.plan)
        self.pending = (move, event, time.perf_counter())

    def _advance(self, times: list[RankTimes]) -> None:
        move, event, started = self.pending
        states = [t.migration for t in times]
        if 2 in states and 0 not in states:  # every rank done, one failed: none of them waits in the abort
            self.driver.abort()
            self.policy.aborted()
            event.update(status="failed", duration_s=round(time.perf_counter() - started, 3))
        elif all(s == 1 for s in states):
            self.driver.switch()
            event.update(status="done", duration_s=round(time.perf_counter() - started, 3), switch_step=self.steps)
            self.policy.switched(self.steps)
            self._awaiting_after.append(event)
        else:
            return  # still preparing in the background; decoding goes on
        self.events.append(event)
        self.pending = None

    def _report_after(self, window: list[float]) -> None:
        """The first full window after a switch gives that move's 'after' figures; the KV bytes sent
        at the switch are the move's too."""
        for event in self._awaiting_after:
            event["step_ms_after"] = [round(t, 3) for t in window]
            event["kv_bytes"] += self._kv_sent
            event["bytes_moved"] += self._kv_sent
            self._kv_sent = 0
        self._awaiting_after = []

    def finish_pending_reports(self) -> None:
        """At the end of a generation: a switched move's figures from what the new plan has run so far."""
        if self._awaiting_after:
            times = self.driver.times()
            self._kv_sent += sum(t.sent_bytes for t in times)
            self._report_after([t.window_ms for t in times])
