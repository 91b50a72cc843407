"""The webhook retry schedule (app/webhooks/delivery.py backoff_s) as pure code: no clock, no wait.

tests/integration/webhooks/test_webhooks.py checks that the delivery row carries this schedule
and that real workers never retry before it."""

from __future__ import annotations

import pytest

from app.core.config import reload_settings
from app.webhooks.delivery import backoff_s


@pytest.fixture()
def schedule(monkeypatch):
    """Set the schedule's settings for this test; the process's own settings come back after."""

    def apply(base_s: float, max_s: float) -> None:
        monkeypatch.setenv("DREAMQ_WEBHOOK_BACKOFF_BASE_S", str(base_s))
        monkeypatch.setenv("DREAMQ_WEBHOOK_BACKOFF_MAX_S", str(max_s))
        reload_settings()

    yield apply
    monkeypatch.undo()
    reload_settings()


def test_each_wait_doubles_from_the_base(schedule):
    schedule(base_s=0.2, max_s=600)
    assert [backoff_s(n) for n in range(1, 7)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4])


def test_the_wait_is_capped(schedule):
    schedule(base_s=2, max_s=5)
    assert [backoff_s(n) for n in range(1, 6)] == [2, 4, 5, 5, 5]
    # Far past the cap the doubling must not overflow into an error or a huge wait.
    assert backoff_s(2000) == 5


def test_the_defaults_are_2_s_doubling_to_10_minutes(schedule, monkeypatch):
    schedule(base_s=0, max_s=0)
    monkeypatch.delenv("DREAMQ_WEBHOOK_BACKOFF_BASE_S")
    monkeypatch.delenv("DREAMQ_WEBHOOK_BACKOFF_MAX_S")
    reload_settings()
    assert [backoff_s(n) for n in (1, 2, 3, 9, 10, 20)] == [2, 4, 8, 512, 600, 600]
