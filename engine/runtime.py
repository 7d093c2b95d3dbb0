"""The step loop: the driver (rank 0) broadcasts each step, every rank runs it.

A step is a small header (op, rows, length, flags) and a payload (token ids,
KV slots, start positions), sent on the control group. Workers block on the
next header; the driver samples from the logits it gathers.
"""

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import PromptTooLong, WorkerLost
from .model import ShardedModel
from .sampling import SamplingParams, sample

OP_FORWARD, OP_STATS, OP_CLEAR, OP_SHUTDOWN = 1, 2, 3, 9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rank_stats(model: ShardedModel) -> torch.Tensor:
    return torch.tensor([peak_rss_mb(), model.w.nbytes() / 2**20], dtype=torch.float64, device=model.device)


def run_op(model: ShardedModel, header: torch.Tensor, payload: torch.Tensor):
    """Execute one broadcast step on this rank; rank 0 gets the result."""
    op, B, S, all_logits = header.tolist()
    if op == OP_FORWARD:
        tokens = payload[: B * S].view(B, S).to(model.device)
        slots = payload[B * S : B * S + B].tolist()
        starts = payload[B * S + B :].tolist()
        return model.forward(tokens, slots, starts, all_logits=bool(all_logits))
    if op == OP_STATS:
        return model.comm.gather_to_driver(rank_stats(model), [2] * model.comm.world_size)
    if op == OP_CLEAR:
        model.clear_slot(B)
        return None
    raise ValueError(f"unknown op {op}")


def serve(model: ShardedModel) -> None:
    """A worker's life: wait for a step, run it, until the driver says stop."""
    comm = model.comm
    while True:
        header = torch.empty(4, dtype=torch.int64)
        comm.broadcast_control(header)
        if header[0] == OP_SHUTDOWN:
            return
        payload = torch.empty(payload_size(header), dtype=torch.int64)
        comm.broadcast_control(payload)
        run_op(model, header, payload)


def payload_size(header: torch.Tensor) -> int:
    op, B, S, _ = header.tolist()
    return B * S + 2 * B if op == OP_FORWARD else 1


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "length"
    prefill_logits: torch.Tensor | None = None  # [S, V] when recorded
    decode_logits: list[torch.Tensor] = field(default_factory=list)  # [V] per step when recorded

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; every later one from a decode step.
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


class Driver:
    """Rank 0: owns a shard like every rank, and drives the others."""

    def __init__(self, model: ShardedModel, check_workers: Callable[[], None] = lambda: None):
        self.model, self.comm = model, model.comm
        # Raises WorkerLost naming the rank that exited; asked after a collective fails,
        # since a dead peer breaks gloo's sockets (or the shared-memory wait) at once.
        self.check_workers = check_workers

    def _step(self, op: int, B: int, S: int, flags: int, payload: list[int]):
        header = torch.tensor([op, B, S, flags], dtype=torch.int64)
        payload_t = torch.tensor(payload or [0], dtype=torch.int64)
        try:
            self.comm.broadcast_control(header)
            self.comm.broadcast_control(payload_t)
            return run_op(self.model, header, payload_t)
        except (RuntimeError, WorkerLost) as e:  # a peer closed its socket, timed out or vanished
            self.check_workers()  # names the worker and its exit code, when we started it
            raise WorkerLost(f"a worker stopped answering: {str(e).splitlines()[0]}") from None

    def forward(self, tokens: list[list[int]], slots: list[int], starts: list[int], all_logits: bool = False):
        B, S = len(tokens), len(tokens[0])
        flat = [t for row in tokens for t in row]
        return self._step(OP_FORWARD, B, S, int(all_logits), flat + list(slots) + list(starts))

    def warm_up(self, slot: int = 0) -> None:
        """One decode step on a scratch slot, so compilation happens at start, not in the first reply."""
        self.forward([[0]], [slot], [0])
        self.clear_slot(slot)

    def stats(self) -> list[dict]:
        table = self._step(OP_STATS, 0, 0, 0, []).view(-1, 2).cpu()
        return [{"rank": r, "peak_rss_mb": round(float(a), 1), "weights_mb": round(float(b), 1)}
                for r, (a, b) in enumerate(table.tolist())]

    def clear_slot(self, slot: int) -> None:
        self._step(OP_CLEAR, slot, 0, 0, [])

    def shutdown(self) -> None:
        self.comm.broadcast_control(torch.tensor([OP_SHUTDOWN, 0, 0, 0], dtype=torch.int64))

    def generate(self, prompt_ids: list[int], params: SamplingParams, slot: int = 0,
                 on_token: Callable[[int], None] | None = None, record_logits: bool = False) -> Generation:
        context = self.model.context
        if not prompt_ids:
            raise PromptTooLong("the prompt is empty")
        if len(prompt_ids) >= context:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the context holds {context} "
                                f"(raise --context, up to the model's {self.model.cfg.max_positions})")
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        out = Generation()
        budget = min(params.max_new_tokens, context - len(prompt_ids))
        if budget <= 0:
            return out
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
            seen = torch.cat([seen, torch.tensor([token])])
            logits = self.forward([[token]], [slot], [position])[0].cpu()  # [V]
            position += 1
            if record_logits:
                out.decode_logits.append(logits)
        out.decode_s = time.perf_counter() - t1
        self.clear_slot(slot)
        return out
