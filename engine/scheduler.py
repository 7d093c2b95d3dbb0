"""Which sequences run in the next step: admission into KV slots, chunked prefill, decode.

Pure bookkeeping, no torch and no threads: the serving loop (app/serving.py) asks `next_step()`, runs
what it says on the engine, and reports back (`prefilled`, `record`, `release`). A step is at most
`prefill_chunk` tokens of newcomers' prompts (several short ones, or a chunk of a long one) plus one
decode row for every sequence already generating, so a long prompt delays the others' next token by
one chunk's time, not by the whole prompt.

Fairness: requests wait in arrival order, slots go to the oldest waiting first, and prompts are
prefilled in the order their sequences were admitted. The waiting line is bounded: `submit` raises
`QueueFull` rather than letting a crowd wait without end.
"""

from collections import deque
from dataclasses import dataclass, field

from .errors import LlmdError


class QueueFull(LlmdError): ...


@dataclass
class Sequence:
    """One request on its way through the engine. `max_new_tokens` is already capped by the context."""

    id: str
    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    slot: int | None = None
    prefilled: int = 0  # prompt tokens written to the cache
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled, once finished

    @property
    def prefilling(self) -> bool:
        return self.finish_reason is None and self.prefilled < len(self.prompt)

    @property
    def decoding(self) -> bool:
        return self.finish_reason is None and not self.prefilling and bool(self.generated)


@dataclass(frozen=True)
class Prefill:
    seq_id: str
    slot: int
    start: int  # prompt[start:end] goes to positions start..end-1
    end: int
    last: bool  # the prompt's last chunk: its last logits give the first token


@dataclass(frozen=True)
class Decode:
    seq_id: str
    slot: int
    token: int  # the last token generated, fed back
    position: int


@dataclass(frozen=True)
class Step:
    prefill: tuple[Prefill, ...] = ()  # prompt chunks, at most `prefill_chunk` tokens in all
    decode: tuple[Decode, ...] = ()  # in slot order, so a packed batch reads its cache as one view

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, slots: int, max_waiting: int, prefill_chunk: int = 128):
        if slots < 1 or max_waiting < 0 or prefill_chunk < 1:
            raise ValueError("slots and prefill_chunk must be at least 1, max_waiting at least 0")
        self.free = list(range(slots))  # kept sorted: the lowest slots first, so batches stay contiguous
        self.max_waiting, self.prefill_chunk = max_waiting, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}  # in admission order

    def submit(self, seq: Sequence) -> None:
        if len(self.waiting) >= len(self.free) + self.max_waiting:
            raise QueueFull(f"the pool is busy: {len(self.running)} running, {len(self.waiting)} waiting; "
                            "try again shortly")
        self.waiting.append(seq)

    def cancel(self, seq_id: str) -> Sequence | None:
        """Mark a sequence cancelled. One still waiting leaves at once (returned); one running keeps its
        slot until the caller releases it, between steps."""
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                seq.finish_reason = "cancelled"
                return seq
        seq = self.running.get(seq_id)
        if seq is not None and seq.finish_reason is None:
            seq.finish_reason = "cancelled"
        return None

    def next_step(self) -> Step:
        self._admit()
        chunks, budget = [], self.prefill_chunk
        for seq in self.running.values():
            if budget == 0:
                break
            if seq.prefilling:
                end = min(seq.prefilled + budget, len(seq.prompt))
                chunks.append(Prefill(seq.id, seq.slot, seq.prefilled, end, end == len(seq.prompt)))
                budget -= end - seq.prefilled
        decode = sorted((Decode(s.id, s.slot, s.generated[-1], len(s.prompt) + len(s.generated) - 1)
                         for s in self.running.values() if s.decoding), key=lambda d: d.slot)
        return Step(tuple(chunks), tuple(decode))

    def _admit(self) -> None:
        while self.free and self.waiting:
            seq = self.waiting.popleft()
            seq.slot = self.free.pop(0)
            self.running[seq.id] = seq

    def prefilled(self, seq_id: str, end: int) -> None:
        self.running[seq_id].prefilled = end

    def record(self, seq_id: str, token: int) -> str | None:
        """A token generated for a sequence; returns its finish reason when this token ends it."""
        seq = self.running[seq_id]
        seq.generated.append(token)
        if seq.finish_reason is None:
            if token in seq.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.max_new_tokens:
                seq.finish_reason = "length"
        return seq.finish_reason

    def finished(self) -> list[Sequence]:
        """Running sequences that have ended (budget, stop token, cancelled): to release."""
        return [s for s in self.running.values() if s.finish_reason is not None]

    def release(self, seq_id: str) -> int:
        """Take a finished sequence out; returns its slot, which the caller zeroes before reuse."""
        seq = self.running.pop(seq_id)
        self.free.append(seq.slot)
        self.free.sort()
        return seq.slot

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
