"""workers/job_tail.py: one tail at a time, in job order, off the caller's thread, waited for at exit."""

from __future__ import annotations

import concurrent.futures._base
import sys
import threading
import time

import pytest

from workers import job_tail


@pytest.fixture(autouse=True)
def fresh_tail(monkeypatch):
    monkeypatch.delenv("DREAMQ_OVERLAP_TAIL", raising=False)
    job_tail.flush()
    job_tail.reset_after_fork()
    yield
    job_tail.flush()
    job_tail.reset_after_fork()


def waiting_for_a_tail(thread: threading.Thread) -> bool:
    """Whether `thread` is blocked, inside workers/job_tail.py, on a tail's Future.

    Not any threading wait: starting the tail thread also waits (Thread.start), briefly."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code.co_name != "wait" or frame.f_code.co_filename != threading.__file__:
        return False
    chain = []
    while frame is not None:
        chain.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return (concurrent.futures._base.__file__, "result") in chain and any(f == job_tail.__file__ for f, _ in chain)


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll a state; the deadline only stops a hang, it decides nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_the_caller_returns_while_its_tail_runs():
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    ran_on = []

    def tail():
        ran_on.append(threading.current_thread().name)
        entered.set()
        release.wait(10)  # only set below, after run() returned: a run in line waits it out
        finished.set()

    job_tail.run(tail)
    # run() is back while the tail cannot have finished: it waits for `release`, which only
    # this thread sets, below. In line, run() would have returned only after it finished.
    assert not finished.is_set()
    assert entered.wait(30), "the tail never started"
    release.set()
    job_tail.flush()
    assert finished.is_set()
    assert ran_on and ran_on[0].startswith("job-tail") and ran_on[0] != threading.current_thread().name


def test_a_second_tail_waits_for_the_first_and_tails_finish_in_order():
    order = []
    first_may_end, first_ended = threading.Event(), threading.Event()

    def first():
        first_may_end.wait(30)
        order.append("first")
        first_ended.set()

    def second():
        order.append("second")

    job_tail.run(first)
    returned = threading.Event()
    first_done_when_run_returned = []

    def submit_second():
        job_tail.run(second)  # blocks until `first` is done: at most one tail in flight
        first_done_when_run_returned.append(first_ended.is_set())
        returned.set()

    caller = threading.Thread(target=submit_second)
    caller.start()
    # `first` is released only once the second caller waits on it (or has returned, which is the
    # failure): no timing decides whether run() blocked.
    wait_until(lambda: returned.is_set() or waiting_for_a_tail(caller), "the second caller blocks or returns")
    first_may_end.set()
    caller.join(30)
    job_tail.flush()
    assert first_done_when_run_returned == [True], "run() returned before the previous tail had finished"
    assert order == ["first", "second"]


def test_flush_waits_for_the_tail_in_flight():
    may_end, flushed = threading.Event(), threading.Event()
    done = []

    def tail():
        may_end.wait(30)
        done.append(1)

    def release_once_flush_blocks():
        # A flush that does not wait returns first, and then the tail is never released.
        wait_until(lambda: flushed.is_set() or waiting_for_a_tail(main), "flush blocks or returns")
        if not flushed.is_set():
            may_end.set()

    main = threading.current_thread()
    job_tail.run(tail)
    releaser = threading.Thread(target=release_once_flush_blocks)
    releaser.start()
    try:
        job_tail.flush()
        flushed.set()
        assert done == [1]
    finally:
        flushed.set()
        releaser.join(30)
        may_end.set()


def test_a_failing_tail_is_logged_and_does_not_stop_the_next(caplog):
    def boom():
        raise RuntimeError("object storage went away")

    done = []
    job_tail.run(boom)
    job_tail.run(lambda: done.append(1))
    job_tail.flush()
    assert done == [1]
    assert "job tail did not finish cleanly" in caplog.text


def test_off_runs_in_line(monkeypatch):
    monkeypatch.setenv("DREAMQ_OVERLAP_TAIL", "0")
    ran_on = []
    job_tail.run(lambda: ran_on.append(threading.current_thread().name))
    assert ran_on == [threading.current_thread().name]
