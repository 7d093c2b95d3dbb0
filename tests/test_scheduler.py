"""The scheduler alone: admission, chunked prefill beside decode, cancellation, release (no engine)."""

import pytest

from llmd.engine.scheduler import QueueFull, Scheduler, Sequence


def seq(name: str, prompt_len: int = 3, budget: int = 4, stops=()) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), budget, frozenset(stops))


def run_prefill(s: Scheduler, step) -> None:
    """What the serving loop does with a step's prefill chunks: record them, and the first token at the end."""
    for p in step.prefill:
        s.prefilled(p.seq_id, p.end)
        if p.last:
            s.record(p.seq_id, 100)


def test_requests_take_the_lowest_free_slots_in_arrival_order_and_the_queue_is_bounded():
    s = Scheduler(slots=2, max_waiting=1)
    for name in "abc":
        s.submit(seq(name))
    with pytest.raises(QueueFull, match="0 running, 3 waiting"):
        s.submit(seq("d"))
    step = s.next_step()
    assert [(q.id, q.slot) for q in s.running.values()] == [("a", 0), ("b", 1)]
    assert [q.id for q in s.waiting] == ["c"] and [p.seq_id for p in step.prefill] == ["a", "b"]
    with pytest.raises(QueueFull, match="2 running, 1 waiting"):  # two in slots, one waiting: full
        s.submit(seq("d"))
    s.cancel("a"), s.release("a")
    s.submit(seq("d"))  # a slot came free


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding():
    s = Scheduler(slots=2, max_waiting=4, prefill_chunk=4)
    s.submit(seq("short", prompt_len=3, budget=50))
    step = s.next_step()
    assert [(p.start, p.end, p.last) for p in step.prefill] == [(0, 3, True)] and not step.decode
    run_prefill(s, step)
    s.submit(seq("long", prompt_len=10))
    for chunk in [(0, 4), (4, 8), (8, 10)]:
        step = s.next_step()
        assert [d.seq_id for d in step.decode] == ["short"]  # its next token never waits for the whole prompt
        for d in step.decode:
            s.record(d.seq_id, 7)
        assert [(p.seq_id, p.start, p.end) for p in step.prefill] == [("long", *chunk)]
        run_prefill(s, step)
    step = s.next_step()
    assert step.prefill == ()
    assert [(d.seq_id, d.position) for d in step.decode] == [("short", 3 + 4 - 1), ("long", 10)]


def test_positions_follow_each_sequence_and_finish_reasons_are_stop_or_length():
    s = Scheduler(slots=2, max_waiting=0)
    s.submit(seq("a", prompt_len=2, budget=3))
    s.submit(seq("b", prompt_len=5, budget=10, stops=[9]))
    run_prefill(s, s.next_step())  # both short prompts in one step
    step = s.next_step()
    assert [(d.seq_id, d.slot, d.token, d.position) for d in step.decode] == [("a", 0, 100, 2), ("b", 1, 100, 5)]
    assert s.record("a", 5) is None and s.record("b", 9) == "stop"
    assert s.record("a", 6) == "length"
    assert {q.id: q.finish_reason for q in s.finished()} == {"a": "length", "b": "stop"}
    assert s.next_step().empty  # finished sequences decode no more


def test_cancelling_frees_a_waiting_request_at_once_and_a_running_one_at_release():
    s = Scheduler(slots=1, max_waiting=2)
    for name in "abc":
        s.submit(seq(name))
    run_prefill(s, s.next_step())
    gone = s.cancel("b")
    assert gone.id == "b" and gone.finish_reason == "cancelled" and [q.id for q in s.waiting] == ["c"]
    assert s.cancel("a") is None and [q.id for q in s.finished()] == ["a"]
    assert s.release("a") == 0
    step = s.next_step()
    assert [(p.seq_id, p.slot) for p in step.prefill] == [("c", 0)]  # the slot goes to the next in line
    assert s.cancel("nobody") is None


def test_released_slots_are_reused_lowest_first():
    s = Scheduler(slots=3, max_waiting=3)
    for name in "abc":
        s.submit(seq(name))
    s.next_step()
    s.cancel("a"), s.cancel("b")
    assert sorted(s.release(x) for x in ("b", "a")) == [0, 1]
    s.submit(seq("d"))
    s.next_step()
    assert s.running["d"].slot == 0 and s.free == [1]


def test_short_prompts_share_a_steps_prefill_budget_and_a_long_one_takes_the_rest():
    s = Scheduler(slots=4, max_waiting=0, prefill_chunk=10)
    for name, n in (("a", 3), ("b", 4), ("c", 9), ("d", 2)):
        s.submit(seq(name, prompt_len=n))
    step = s.next_step()
    assert [(p.seq_id, p.start, p.end, p.last) for p in step.prefill] == [("a", 0, 3, True), ("b", 0, 4, True),
                                                                           ("c", 0, 3, False)]
    run_prefill(s, step)
    step = s.next_step()
    assert [(p.seq_id, p.start, p.end) for p in step.prefill] == [("c", 3, 9), ("d", 0, 2)]
    assert [(d.seq_id, d.slot) for d in step.decode] == [("a", 0), ("b", 1)]  # in slot order
