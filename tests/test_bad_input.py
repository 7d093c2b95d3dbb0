"""Bad input and lost workers end in one clear `llmd: error:` line, never a traceback or a hang.

Every case runs the real CLI in a child process.
"""

import os
import select
import signal
import subprocess
import time

import psutil
import pytest

from conftest import CLI, llmd, llmd_here

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 10  # about 100 tokens


def assert_clean_error(args: list[str], phrase: str, limit_s: float = 90, here: bool = True):
    """`here`: the CLI's code in this process, for errors found before any process starts (an
    exception escaping it fails the test as a traceback would); else the real command, which
    must also end within `limit_s` and leave nothing running."""
    if here:
        run = llmd_here("generate", *args)
    else:
        run = llmd("generate", *args, timeout=limit_s)  # raises TimeoutExpired on a hang
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmd: error:"), run.stderr
    assert phrase in lines[0], lines[0]


def test_unknown_model_path(tmp_path):
    assert_clean_error(["--model", str(tmp_path / "no-such-model"), "hi"], "no model at", here=False)


def test_directory_without_config_json(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    assert_clean_error(["--model", str(tmp_path), "hi"], "has no config.json")


def test_shares_that_do_not_match_workers():
    assert_clean_error(["--workers", "2", "--shares", "1,1,1", "hi"], "--shares has 3 values but there are 2 workers")


def test_more_workers_than_query_heads():
    assert_clean_error(["--workers", "10", "hi"], "only 9 query heads")


def test_prompt_longer_than_context():
    # Checked before any process starts; a clean shutdown after an error in the engine is the killed worker's test.
    assert_clean_error(["--workers", "2", "--context", "16", "--compile", "off", LONG_PROMPT], "the context holds 16",
                       here=True)


def test_zero_workers():
    assert_clean_error(["--workers", "0", "hi"], "--workers must be at least 1")


@pytest.mark.parametrize("shares", ["inf,1", "1e308,1e308"])
def test_infinite_shares(shares):
    assert_clean_error(["--workers", "2", "--shares", shares, "hi"], "positive finite number")


@pytest.mark.parametrize("option,value,phrase", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--top-p", "1.5", "top_p"),
    ("--repetition-penalty", "0", "repetition_penalty"),
    ("--max-new-tokens", "-3", "max_new_tokens"),
])
def test_bad_sampling_options(option, value, phrase):
    assert_clean_error([option, value, "hi"], phrase)


def test_zero_timeout():
    assert_clean_error(["--workers", "2", "--timeout", "0", "hi"], "--timeout must be a positive")


# A worker that dies mid-generation


def read_some(pipe, timeout_s: float) -> bytes:
    """The first bytes the process writes to `pipe`, or b"" if none come in time."""
    ready, _, _ = select.select([pipe], [], [], timeout_s)
    return os.read(pipe.fileno(), 4096) if ready else b""


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while still_running(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return still_running(procs)


def test_worker_killed_mid_generation():
    # Text mode streams tokens as they come; 1500 tokens take minutes on a CPU, so the kill lands mid-way.
    cli = subprocess.Popen(
        [*CLI, "generate", "--workers", "2", "--compile", "off", "--ignore-eos", "--max-new-tokens", "1500", "--greedy",
         "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    children: list[psutil.Process] = []
    try:
        assert read_some(cli.stdout, timeout_s=180), "no generated text appeared"
        children = psutil.Process(cli.pid).children(recursive=True)
        workers = [c for c in children if "llmd.app.worker" in cmdline(c)]
        assert len(workers) == 1, [cmdline(c) for c in children]
        workers[0].send_signal(signal.SIGKILL)

        t0 = time.monotonic()
        _, err = cli.communicate(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        for p in still_running(children) + ([psutil.Process(cli.pid)] if cli.poll() is None else []):
            p.kill()  # never leave a stray process behind a failed test
        cli.wait()

    stderr = err.decode()
    assert cli.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert "llmd: error:" in stderr and "worker" in stderr and "rank 1" in stderr, stderr
    assert not wait_gone(children, timeout_s=10), "a child process outlived the CLI"


def test_plan_files_that_do_not_fit_the_model_or_the_workers(tmp_path):
    other = llmd_here("plan", "--model", "llama-3.1-8b", "--device", "a:a100-80gb", "--json")
    (tmp_path / "other.json").write_text(other.stdout)
    assert_clean_error(["--plan", str(tmp_path / "other.json"), "hi"], "must cover layers 0..29")
    (tmp_path / "junk.json").write_text("{not json")
    assert_clean_error(["--plan", str(tmp_path / "junk.json"), "hi"], "is not a plan from `llmd plan --json`")
    assert_clean_error(["--plan", str(tmp_path / "missing.json"), "hi"], "cannot read the plan file")
    mine = llmd_here("plan", "--device", "a:cpu", "--device", "a:cpu", "--weights", "fp32", "--json")
    (tmp_path / "two.json").write_text(mine.stdout)
    assert_clean_error(["--plan", str(tmp_path / "two.json"), "--workers", "3", "hi"], "has 2 ranks")
