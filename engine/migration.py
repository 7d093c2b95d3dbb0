"""One plan epoch change on one rank, double-buffered.

`prepare` starts a background thread that, while decoding goes on with the old shard,
builds the rank's new shard (what the old one holds copied in memory, only the slices it
gains read from its own local checkpoint: engine/reslice.py), allocates the new KV
cache, copies the prefix of the KV heads it keeps, and exchanges with the other ranks
of its stage the prefix of the KV heads that change owner (point to point, on a gloo
group of its own). `switch`, at a step boundary that every rank reaches together, sends
the few positions written since, and adopts the new shard; a slot cleared in between (its
chat ended, and a new one may have started in it) has its stale prefix zeroed and is
copied whole. The old shard and cache stay in use, untouched, until that moment.

Every rank derives the same list of transfers from the two plans, in the same order, so
the sends and receives pair up without any further message. A rank whose preparation fails
(a slice it cannot read, memory it cannot get) still takes its part in them, sending from its
live cache and dropping what it receives, so no peer waits out the group's timeout; the
driver aborts the move once every rank is done.

The background thread shares the rank's cores (and the GIL) with the decode steps, so it
runs at the lowest CPU priority (it mostly gets the time a rank spends waiting for others),
builds one layer (or block of vocabulary rows), then rests `PACE` times as long, and
allocates the new KV cache layer by layer. While it runs, the interpreter hands the GIL
over every 0.1 ms instead of 5 ms, so a step's Python between two collectives does not
queue behind the loader.
"""

import os
import sys
import threading
import time
from dataclasses import dataclass

import torch

from .model import ShardedModel, ShardWeights
from .plan import Plan


@dataclass(frozen=True)
class Transfer:
    """KV head `head` goes from `src` to `dst` (global ranks of one stage)."""

    src: int
    dst: int
    head: int


def transfers(old: Plan, new: Plan, stage: int) -> list[Transfer]:
    """Every KV head a rank owns in `new` but not in `old`, from the lowest rank that had it."""
    ranks = old.stages[stage].ranks
    out = []
    for dst in ranks:
        gained = sorted(set(new.ranks[dst].kv_heads) - set(old.ranks[dst].kv_heads))
        for head in gained:
            src = min(r for r in ranks if head in old.ranks[r].kv_heads)
            out.append(Transfer(src, dst, head))
    return out


PACE = 2.0


def rest(seconds: float) -> None:
    time.sleep(seconds * PACE)


def release(tensors) -> None:
    """Drop the last references to a replaced shard from a low-priority thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass
    del tensors


class Migration:
    def __init__(self, model: ShardedModel, new_plan: Plan):
        self.model, self.old, self.new = model, model.plan, new_plan
        self.start = list(model.filled)  # positions per slot already written: the prefix
        self.moves = transfers(self.old, new_plan, model.shard.stage)
        self.unchanged = self.old.ranks[model.rank] == new_plan.ranks[model.rank]  # another rank's move
        self.weights: ShardWeights | None = None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.error: BaseException | None = None
        self.sent_bytes = 0
        self.cleared: set[int] = set()  # slots released since the prefix was taken: what was copied is stale
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._prepare, name="llmd-migration", daemon=True)
        self.thread.start()

    @property
    def status(self) -> int:
        """0: still preparing, 1: ready to switch, 2: failed (the driver aborts the move)."""
        if not self.done.is_set():
            return 0
        return 2 if self.error else 1

    def _prepare(self) -> None:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (OSError, AttributeError):
            pass  # elsewhere it competes at normal priority, still paced
        try:
            m = self.model
            if self.unchanged:  # it may still send KV heads it keeps to a rank that gains a replica
                self.weights, self.k, self.v = m.w, m.k_cache, m.v_cache
            else:
                self.weights = m.load(self.new, rest, reuse=(self.old.ranks[m.rank], m.w))
                shape = (m.slots, len(self.new.ranks[m.rank].kv_heads), m.context, m.cfg.head_dim)
                for _ in m.k_cache:
                    t = time.perf_counter()
                    self.k.append(torch.zeros(shape, dtype=m.dtype, device=m.device))
                    self.v.append(torch.zeros(shape, dtype=m.dtype, device=m.device))
                    rest(time.perf_counter() - t)
        except BaseException as e:  # reported to the driver through `status`, which aborts the move
            self.error = e
        try:  # failed or not: the other ranks' sends and receives pair up with ours
            self._copy(lambda slot: (0, self.start[slot]))
        except BaseException as e:
            self.error = self.error or e
        finally:
            sys.setswitchinterval(interval)
            self.done.set()

    def slot_cleared(self, slot: int) -> None:
        """The chat in `slot` ended while the move was prepared; a later one may already be using it."""
        self.cleared.add(slot)

    def switch(self) -> int:
        """At the step boundary: the positions written since `prepare`, then the new shard. Returns bytes sent."""
        self.thread.join()
        if self.error:
            raise self.error
        m = self.model
        now = list(m.filled)
        if not self.unchanged:  # (unchanged, the new cache is the live one, which clearing zeroed)
            for slot in self.cleared:  # the prefix copied there is a finished chat's: nothing of it may survive
                for kc, vc in zip(self.k, self.v):
                    kc[slot, :, : self.start[slot]].zero_()
                    vc[slot, :, : self.start[slot]].zero_()
        self._copy(lambda slot: (0 if slot in self.cleared else self.start[slot], now[slot]))
        old = (m.w, m.k_cache, m.v_cache)
        m.adopt(self.new, self.weights, self.k, self.v)
        if not self.unchanged:  # returning the old shard's memory takes milliseconds: not on this step
            threading.Thread(target=release, args=(old,), name="llmd-release", daemon=True).start()
        return self.sent_bytes

    def _copy(self, span) -> None:
        """Positions span(slot) = [a, b) of every kept head locally, and of every moved head over the wire."""
        m = self.model
        old_local = {h: i for i, h in enumerate(self.old.ranks[m.rank].kv_heads)}
        new_local = {h: i for i, h in enumerate(self.new.ranks[m.rank].kv_heads)}
        gained = {t.head for t in self.moves if t.dst == m.rank}
        for head, i in new_local.items():
            if head in old_local and head not in gained and not self.unchanged and not self.error:
                for slot in range(m.slots):
                    a, b = span(slot)
                    for new_c, old_c in ((self.k, m.k_cache), (self.v, m.v_cache)):
                        for layer in range(len(new_c)):
                            new_c[layer][slot, i, a:b] = old_c[layer][slot, old_local[head], a:b]
        for t in self.moves:  # the same order on every rank
            for slot in range(m.slots):
                a, b = span(slot)
                if b > a and m.rank in (t.src, t.dst):
                    self._exchange(t, slot, a, b, old_local, new_local)

    def _exchange(self, t: Transfer, slot: int, a: int, b: int, old_local: dict, new_local: dict) -> None:
        m = self.model
        if m.rank == t.src:
            i = old_local[t.head]
            block = torch.stack([torch.stack([kc[slot, i, a:b], vc[slot, i, a:b]])
                                 for kc, vc in zip(m.k_cache, m.v_cache)])  # [L, 2, b - a, D]
            m.comm.send_migration(block, t.dst)
            self.sent_bytes += block.numel() * block.element_size()
            return
        block = torch.empty(len(m.k_cache), 2, b - a, m.cfg.head_dim, dtype=m.dtype, device=m.device)
        m.comm.recv_migration(block, t.src)
        if self.error:
            return  # this rank's move failed: it only takes part, so that the sender is not left waiting
        i = new_local[t.head]
        for layer in range(len(self.k)):
            self.k[layer][slot, i, a:b] = block[layer, 0]
            self.v[layer][slot, i, a:b] = block[layer, 1]
