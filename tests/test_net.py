"""Helpers for processes on the LAN."""

from llmd.app.net import worker_failure


def test_a_workers_failure_line_skips_torch_warnings():
    log = "loading\n[W1127 socket.cpp:207] [c10d] The hostname of the client socket cannot be retrieved.\n"
    assert worker_failure(log) == "loading"
    assert worker_failure(log + "llmd worker rank 2: OutOfMemoryError: ...\n[W again]\n").startswith("llmd worker rank 2")
    assert worker_failure("") == ""
