"""The one engine loop: every request, from the web page or the API, runs here, many in each step.

`Serving.submit` journals a request, queues it and returns a `Ticket`, whose `events()` yield typed
events: `Token` (a text delta) as the reply grows, then one `Finished` (with the `Reply`'s figures)
or one `Failed`. A single thread drives the engine: each step it asks the scheduler
(engine/scheduler.py) what to run (one chunk of a newcomer's prompt, one decode row for every
sequence already generating), runs it, samples each row with that sequence's own settings, and
hands each new token to its ticket. A finished or cancelled sequence leaves between two steps; its
KV slot is zeroed before anyone else gets it.

Each request's cost is its share of the pool's energy while it ran: every step's time is split
evenly among the sequences in it.
"""

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llmd.engine.errors import LlmdError
from llmd.engine.runtime import Driver, check_prompt
from llmd.engine.sampling import SamplingParams, sample
from llmd.engine.scheduler import Scheduler, Sequence, Step

from . import costs
from .store import Store, StoreError
from .text import Detokenizer, TextModel


class PoolNotReady(LlmdError): ...


@dataclass(frozen=True)
class Reply:
    """What a finished reply measured: the payload of `Finished`."""

    request_id: str
    text: str
    tokens: int
    prompt_tokens: int
    ttft_s: float  # from submission to the first token, waiting included
    tokens_per_s: float  # decode speed after the first token
    finish_reason: str  # stop | length | cancelled
    energy_j: float
    energy_estimated: bool
    cost: float
    currency: str


@dataclass(frozen=True)
class Token:
    text: str  # the reply's new text ("" while a character or a possible stop string is incomplete)
    token_id: int


@dataclass(frozen=True)
class Finished:
    reply: Reply


@dataclass(frozen=True)
class Failed:
    error: str


Event = Token | Finished | Failed


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    user: str = "web"
    api_key: str | None = None  # the key's name, for the journal
    prompt_text: str = ""  # what the journal shows of the prompt
    stop: tuple[str, ...] = ()  # stop strings: the reply ends before the first of them


class Ticket:
    """One submitted request's events. Leaving `events()` early (a closed page, a dropped connection)
    cancels the request."""

    def __init__(self, request_id: str, cancel: Callable[[], None]):
        self.id = request_id
        self._queue: queue.Queue[Event] = queue.Queue()
        self._cancel = cancel

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def cancel(self) -> None:
        self._cancel()

    def get(self, timeout_s: float) -> Event | None:
        """The next event, or None if none comes within `timeout_s` (for a caller that polls a client)."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def events(self, should_stop: Callable[[], bool] = lambda: False, poll_s: float = 0.1) -> Iterator[Event]:
        done = False
        try:
            while True:
                event = self.get(poll_s)
                if event is not None:
                    yield event
                    if isinstance(event, Finished | Failed):
                        done = True
                        return
                if should_stop():
                    self.cancel()
        finally:
            if not done:
                self.cancel()


@dataclass
class Live:
    """A sequence's state outside the scheduler: its ticket, sampling and text."""

    request: Request
    ticket: Ticket
    detok: Detokenizer
    generator: torch.Generator | None
    created: float
    started: float | None = None  # admitted to a slot
    first_token: float | None = None
    text: str = ""
    shown: int = 0  # characters of `text` sent as Token events
    busy_s: float = 0.0  # this sequence's share of the steps it was in


@dataclass(frozen=True)
class Limits:
    slots: int  # KV slots: sequences generating at once
    max_waiting: int  # requests queued beyond the free slots before "busy"
    prefill_chunk: int = 128  # prompt tokens per step


class Serving:
    """Owns the engine's driver while it runs. `close()` ends the loop, failing whatever is in flight."""

    def __init__(self, driver: Driver, text: TextModel, model: str, store: Store, limits: Limits,
                 on_lost: Callable[[BaseException], None] = lambda e: None,
                 on_moved: Callable[[dict], None] = lambda plan: None,
                 sample_now: Callable[[], None] = lambda: None):
        self.driver, self.text, self.model, self.store = driver, text, model, store
        self.on_lost, self.on_moved, self.sample_now = on_lost, on_moved, sample_now
        self.scheduler = Scheduler(limits.slots, limits.max_waiting, limits.prefill_chunk)
        self.live: dict[str, Live] = {}
        self.problem: str = ""  # why the loop stopped, once it has
        self.journal_problem: str = ""  # the last failure to journal a finished request
        self.version = 0  # bumped when a request is journalled or ends, so live views know to redraw
        self._lock = threading.Condition()
        self._closing = False
        self._events_seen = 0
        self._pending_events: list[dict] = []  # balancer events whose "after" figures are not in yet
        self._thread = threading.Thread(target=self._loop, name="llmd-serving", daemon=True)
        self._thread.start()

    # ---- what callers use

    def submit(self, request: Request) -> Ticket:
        """Journal and queue a request. Raises PromptTooLong, QueueFull or PoolNotReady (nothing queued)."""
        check_prompt(request.prompt_ids, self.driver.model.context, self.driver.model.cfg.max_positions)
        budget = min(request.sampling.max_new_tokens, self.driver.model.context - len(request.prompt_ids))
        request_id = self.store.add_request(request.user, self.model, len(request.prompt_ids),
                                            prompt=request.prompt_text, api_key=request.api_key)
        ticket = Ticket(request_id, lambda: self.cancel(request_id))
        seq = Sequence(request_id, list(request.prompt_ids), budget, frozenset(request.sampling.stop_token_ids))
        seed = request.sampling.seed
        live = Live(request, ticket, self.text.detokenizer(),
                    torch.Generator().manual_seed(seed) if seed is not None else None, time.time())
        try:
            with self._lock:
                if self._closing or self.problem:
                    raise PoolNotReady(f"the model is not serving: {self.problem or 'shutting down'}")
                self.scheduler.submit(seq)
                self.live[request_id] = live
                self.version += 1
                self._lock.notify_all()
        except LlmdError as e:
            self.store.update_request(request_id, status="failed", error=str(e), finished=time.time())
            raise
        if budget <= 0:
            self.cancel(request_id)
        return ticket

    def cancel(self, request_id: str) -> None:
        with self._lock:
            waiting = self.scheduler.cancel(request_id)
            self._lock.notify_all()
        if waiting is not None:  # never ran: nothing to release
            self._finish(waiting)

    def waiting(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting)

    def running(self) -> int:
        with self._lock:
            return len(self.scheduler.running)

    def close(self, why: str = "the pool is shutting down") -> None:
        with self._lock:
            self._closing = True
            self.problem = self.problem or why
            self._lock.notify_all()
        self._thread.join(timeout=60)
        self._fail_all(self.problem)

    # ---- the loop

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closing and self.scheduler.idle:
                        self._flush_balancer_events(idle=True)
                        self._lock.wait(timeout=0.5)
                    if self._closing:
                        return
                    ended = self.scheduler.finished()
                    step = self.scheduler.next_step() if not ended else Step()
                for seq in ended:
                    self._finish(seq)
                if not step.empty:
                    self._run(step)
        except Exception as e:  # a lost worker (WorkerLost) or a fault: every request in flight is told
            self.problem = describe_error(e)
            self._fail_all(self.problem)
            self.on_lost(e)

    def _run(self, step: Step) -> None:
        for p in step.prefill:
            live = self.live[p.seq_id]
            live.started = live.started or time.time()
            if p.start == 0:
                self.store.update_request(p.seq_id, status="running", started=live.started)
            t0 = time.perf_counter()
            prompt = self.scheduler.running[p.seq_id].prompt
            logits = self.driver.forward([prompt[p.start : p.end]], [p.slot], [p.start])
            live.busy_s += time.perf_counter() - t0
            with self._lock:
                self.scheduler.prefilled(p.seq_id, p.end)
            if p.last:
                self._deliver(p.seq_id, logits[0])
        if step.decode:
            t0 = time.perf_counter()
            logits = self.driver.forward([[d.token] for d in step.decode], [d.slot for d in step.decode],
                                         [d.position for d in step.decode])
            share = (time.perf_counter() - t0) / len(step.decode)
            for row, d in enumerate(step.decode):
                self.live[d.seq_id].busy_s += share
                self._deliver(d.seq_id, logits[row])
            if self.driver.rebalancer:
                self.driver.rebalancer.after_step()
                self._flush_balancer_events()

    def _deliver(self, seq_id: str, logits: torch.Tensor) -> None:
        """Sample a sequence's next token and hand its text on."""
        live, seq = self.live[seq_id], self.scheduler.running[seq_id]
        params = live.request.sampling
        # The tokens so far matter only to a repetition penalty: build them for no one else.
        seen = torch.tensor(seq.prompt + seq.generated) if params.repetition_penalty != 1.0 else torch.empty(0)
        token = sample(logits.cpu(), params, seen, live.generator)
        live.first_token = live.first_token or time.time()
        with self._lock:
            reason = self.scheduler.record(seq_id, token)
        if token not in live.request.sampling.stop_token_ids:
            live.text += live.detok.add(token)
        if self._hit_stop_string(live):
            with self._lock:
                self.scheduler.running[seq_id].finish_reason = "stop"
            reason = "stop"
        self._show(live, token, done=reason is not None)

    def _hit_stop_string(self, live: Live) -> bool:
        cut = min((i for i in (live.text.find(s) for s in live.request.stop if s) if i >= 0), default=-1)
        if cut < 0:
            return False
        live.text = live.text[:cut]
        return True

    def _show(self, live: Live, token: int, done: bool) -> None:
        """Send the text not yet shown, holding back a tail that may still become a stop string."""
        hold = 0 if done else max((len(s) - 1 for s in live.request.stop), default=0)
        end = max(live.shown, len(live.text) - hold)
        live.ticket.put(Token(live.text[live.shown : end], token))
        live.shown = end

    def _finish(self, seq: Sequence) -> None:
        """Release a finished sequence's slot (zeroed), journal it and send its `Finished`."""
        with self._lock:
            live = self.live.pop(seq.id, None)
        if live is None:  # failed meanwhile (the loop stopped): it has had its event
            return
        if seq.slot is not None:
            with self._lock:
                self.scheduler.release(seq.id)
            self.driver.clear_slot(seq.slot)
        if live.text[live.shown :]:
            live.ticket.put(Token(live.text[live.shown :], -1))
        try:
            reply = self._journal(seq, live)
        except StoreError as e:  # the reply itself is not lost for a journal that failed to record it
            reply = Reply(seq.id, live.text, len(seq.generated), len(seq.prompt), 0.0, 0.0,
                          seq.finish_reason or "cancelled", 0.0, True, 0.0, "")
            self.journal_problem = f"journal: {describe_error(e)}"
        self.version += 1
        live.ticket.put(Finished(reply))

    def _journal(self, seq: Sequence, live: Live) -> Reply:
        finished = time.time()
        reason = seq.finish_reason or "cancelled"
        tokens = len(seq.generated)
        ttft = (live.first_token - live.created) if live.first_token else 0.0
        decode_s = finished - live.first_token if live.first_token else 0.0
        tps = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0
        started = live.started or finished
        if live.started:
            self.sample_now()  # a reading after the end, so the energy integral covers all of the request
        settings = self.store.settings()
        traces, estimated = self.store.power_traces(started, finished)
        share = min(live.busy_s / (finished - started), 1.0) if finished > started else 0.0
        cost = costs.request_cost(traces, started, finished, settings, estimated=estimated, share=share)
        status = "cancelled" if reason == "cancelled" else "done"
        self.store.update_request(seq.id, status=status, generated_tokens=tokens, ttft_s=ttft,
                                  decode_tokens_per_s=tps, energy_j=cost.energy_j, energy_estimated=cost.estimated,
                                  cost=cost.total, finished=finished, busy_s=live.busy_s,
                                  **({} if live.started else {"started": started}))
        if live.started:
            self.store.add_rank_steps(finished, [round(t.recent_ms, 3) for t in self.driver.times(reset_sent=False)])
        return Reply(seq.id, live.text, tokens, len(seq.prompt), ttft, tps, reason, cost.energy_j, cost.estimated,
                     cost.total, settings.currency)

    def _flush_balancer_events(self, idle: bool = False) -> None:
        """Journal the balancer's moves once their figures are complete (or the pool goes idle)."""
        rebalancer = self.driver.rebalancer
        if rebalancer is None:
            return
        if idle:
            rebalancer.finish_pending_reports()  # nothing to do (and no step) unless a move awaits its figures
        new = rebalancer.events[self._events_seen :]
        self._events_seen = len(rebalancer.events)
        self._pending_events += new
        if any(e["status"] == "done" for e in new):
            self.on_moved(self.driver.plan.to_dict())
        ready = [e for e in self._pending_events if idle or e["status"] != "done" or e["step_ms_after"] is not None]
        if ready:
            self.store.add_migrations([dict(e) for e in ready])
            self.version += 1
            self._pending_events = [e for e in self._pending_events if e not in ready]

    def _fail_all(self, why: str) -> None:
        """Every sequence still in flight ends with `Failed`, journalled as failed."""
        with self._lock:
            gone = list(self.live.items())
            self.live.clear()
            self.scheduler.waiting.clear()
            self.scheduler.running.clear()
        for request_id, live in gone:
            try:
                self.store.update_request(request_id, status="failed", error=why, finished=time.time())
            except StoreError:
                pass
            live.ticket.put(Failed(why))


def describe_error(e: BaseException) -> str:
    """One line for the page: the message of our own errors, the kind and message of anything else."""
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, LlmdError) and text else f"{type(e).__name__}: {text}".rstrip(": ")
