"""The Celery settings docs/architecture.md says matter for long GPU jobs are the ones in force."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from app.core.config import ConfigError, get_settings
from app.core.queues import pool_queues
from tasks.celery_app import celery_app, check_time_limits


def test_json_only_and_late_acks_with_prefetch_one():
    conf = celery_app.conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_hijack_root_logger is False
    options = conf.broker_transport_options
    assert options["queue_order_strategy"] == "priority"


def test_time_limits_nest_inside_the_visibility_timeout():
    settings = get_settings()
    assert settings.job_soft_time_limit_s < settings.job_hard_time_limit_s < settings.broker_visibility_timeout_s
    assert celery_app.conf.broker_transport_options["visibility_timeout"] == settings.broker_visibility_timeout_s
    from tasks.generate import generate

    assert (generate.soft_time_limit, generate.time_limit) == (
        settings.job_soft_time_limit_s,
        settings.job_hard_time_limit_s,
    )
    assert generate.acks_late is True


@pytest.mark.parametrize(("soft", "hard", "visibility"), [(100, 100, 500), (100, 600, 500), (700, 600, 800)])
def test_misordered_limits_fail_fast_naming_the_variables(soft, hard, visibility):
    bad = dataclasses.replace(
        get_settings(), job_soft_time_limit_s=soft, job_hard_time_limit_s=hard, broker_visibility_timeout_s=visibility
    )
    with pytest.raises(ConfigError, match="DREAMQ_JOB_SOFT_TIME_LIMIT_S < DREAMQ_JOB_HARD_TIME_LIMIT_S"):
        check_time_limits(bad)


def test_pool_queues_are_in_tier_order():
    assert pool_queues("east", "demo") == [
        "east.demo.api",
        "east.demo.enterprise",
        "east.demo.unlimited",
        "east.demo.light",
        "east.demo.free",
    ]


def test_a_worker_parent_never_imports_torch():
    """CUDA must not be initialised before fork: the worker parent imports every task module
    (Celery's include=) without importing torch; only the child running a job loads it."""
    code = (
        "import sys; from tasks.celery_app import celery_app; celery_app.loader.import_default_modules(); "
        "assert 'dreamq.generate' in celery_app.tasks; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
