"""workers/job_tail.py: one tail at a time, in job order, off the caller's thread, waited for at exit."""

from __future__ import annotations

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


def test_the_caller_returns_while_its_tail_runs():
    release = threading.Event()
    ran_on = []

    def tail():
        ran_on.append(threading.current_thread().name)
        release.wait(5)

    started = time.monotonic()
    job_tail.run(tail)
    assert time.monotonic() - started < 1.0  # did not wait for the 5 s tail
    release.set()
    job_tail.flush()
    assert ran_on and ran_on[0].startswith("job-tail") and ran_on[0] != threading.current_thread().name


def test_a_second_tail_waits_for_the_first_and_tails_finish_in_order():
    order = []
    first_may_end = threading.Event()

    def first():
        first_may_end.wait(5)
        order.append("first")

    def second():
        order.append("second")

    job_tail.run(first)
    threading.Timer(0.3, first_may_end.set).start()
    started = time.monotonic()
    job_tail.run(second)  # blocks until `first` is done: at most one tail in flight
    waited = time.monotonic() - started
    job_tail.flush()
    assert order == ["first", "second"]
    assert waited >= 0.25


def test_flush_waits_for_the_tail_in_flight():
    done = []
    job_tail.run(lambda: (time.sleep(0.3), done.append(1)))
    assert done == []
    job_tail.flush()
    assert done == [1]


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
