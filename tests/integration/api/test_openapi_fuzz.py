"""schemathesis over /v1/openapi.json, against the real app (Postgres, Redis, S3) in-process.

Every operation the document lists is called with valid (positive) and invalid (negative)
generated input, as a real user (and as an admin for /v1/admin), and every response must be:
not a 5xx, a documented status, the documented content type, and match the documented schema
(errors included: the JSON error shape). Failures are collected over the whole run and reported
together, so one run shows every problem; generation is derandomized and shrinking is off, so
the run is reproducible and bounded.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.drivers import CoverageGenerator
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.generation.overrides import Override
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from app.core import config
from app.db.models import Tier
from app.db.session import transaction
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 25
# Per operation, from the coverage phase (it is finite; this only bounds a very wide schema).
COVERAGE_CASES = 150
# Submission is where most input lands: explore it harder.
EXAMPLES = {"POST /v1/generations": 150}
# Cases with known ids (a real job, the fuzz model): fewer, they explore less.
KNOWN_ID_EXAMPLES = 10
# The one tier the admin PATCH fuzz may change; restored afterwards.
FUZZED_TIER = "free"


@pytest.fixture(scope="module")
def fuzz_model(stack_env, parked_model):
    """A model of its own (two versions) so promote/canary/rollback fuzzing touches no other test's model."""
    name = f"fuzz-{stack_env.run_id}"
    push_fixture_model(name, TINY_BUNDLE, dispatch_limit=1)
    push_fixture_model(name, TINY_BUNDLE, dispatch_limit=1, force=True)
    # A user and a cluster of the same name (the admin {name} the fuzz uses), so user and cluster
    # mutations reach their code without touching another test's rows; the pool local.<name>
    # takes the {cluster}/{model} pool mutations (drain, enable, limits) for the same reason.
    from app.admin.clusters import add_cluster
    from app.db.models import User

    with transaction() as session:
        session.add(User(name=name, tier="free"))
        add_cluster(session, name, "burst", actor="fuzz")
    return name


@pytest.fixture()
def restore_tiers(stack_env):
    columns = [c.key for c in Tier.__table__.columns]
    with transaction() as session:
        saved = {t.name: {c: getattr(t, c) for c in columns} for t in session.scalars(select(Tier))}
    yield
    with transaction() as session:
        for tier in session.scalars(select(Tier)):
            for column, value in saved[tier.name].items():
                setattr(tier, column, value)


def _check(operation, case, headers: dict[str, str], label: str, failures: dict, statuses: Counter) -> None:
    try:
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        statuses[response.status_code] += 1
    except (FailureGroup, Failure) as exc:
        found = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
        for failure in found:
            key = (operation.label, type(failure).__name__, getattr(failure, "status_code", None))
            failures.setdefault(key, f"{label}: {failure.title}: {failure.message}\n  {case.as_curl_command(headers)}")


def _coverage(
    operation,
    headers: dict[str, str],
    failures: dict,
    counter: list,
    statuses: Counter,
    path_parameters: dict | None = None,
) -> None:
    """schemathesis' coverage phase: boundary values, missing/extra fields, wrong types, deterministically."""
    generator = CoverageGenerator(
        operation=operation,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=operation.schema.config.generation_for(operation=operation, phase="coverage"),
        auth_storage=None,
        override=Override(path_parameters=path_parameters or {}),
        feedback=FeedbackSources(),
    )
    for case in itertools.islice(generator, COVERAGE_CASES):
        counter[0] += 1
        _check(operation, case, headers, "coverage", failures, statuses)


def _run(
    operation,
    headers: dict[str, str],
    mode: GenerationMode,
    examples: int,
    failures: dict,
    counter: list,
    statuses: Counter,
    path_parameters: dict | None = None,
) -> None:
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        counter[0] += 1
        _check(operation, case, headers, mode.value, failures, statuses)

    try:
        run()
    except Unsatisfiable:
        # Nothing in this operation can be made invalid (no parameters, no body): no negative cases.
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_every_operation_conforms_to_the_schema(
    flask_app, stack_env, parked_model, fuzz_model, restore_tiers, monkeypatch
):
    # Submissions that name no model get `parked` (a pool, no worker): valid bodies create real jobs.
    monkeypatch.setattr(config, "_settings", dataclasses.replace(config.get_settings(), default_model="parked"))
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", flask_app)
    _, user_key = create_user("api")
    _, admin_key = create_user("api", scopes=("admin",))
    job_id = (
        flask_app.test_client()
        .post("/v1/generations", json={"prompt": "fuzz seed job", "model": "parked"}, headers=auth(user_key))
        .json["id"]
    )
    known = {"job_id": job_id, "name": fuzz_model}

    failures: dict = {}
    counter = [0]
    statuses: Counter = Counter()
    operations = 0
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        admin = operation.path.startswith("/v1/admin/")
        headers = auth(admin_key if admin else user_key)
        fixed = {}
        if operation.path == "/v1/admin/tiers/{name}":
            fixed = {"name": FUZZED_TIER}  # a random name only ever 404s; a real one reaches the update (restored)
        elif admin and "{name}" in operation.path:
            fixed = {"name": fuzz_model}
        elif admin and "{cluster}" in operation.path:
            fixed = {"cluster": "local", "model": fuzz_model}
        _coverage(operation, headers, failures, counter, statuses, fixed or None)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = EXAMPLES.get(operation.label, MAX_EXAMPLES)
            _run(operation, headers, mode, examples, failures, counter, statuses, fixed or None)
        params = {p: v for p, v in known.items() if "{" + p + "}" in operation.path}
        if params and not fixed:
            _run(operation, headers, GenerationMode.POSITIVE, KNOWN_ID_EXAMPLES, failures, counter, statuses, params)
    elapsed = time.perf_counter() - started
    print(
        f"\nschemathesis: {counter[0]} cases over {operations} operations in {elapsed:.1f} s, "
        f"{len(failures)} distinct failures; statuses {dict(sorted(statuses.items()))}"
    )
    assert not failures, "\n\n".join(f"{k[0]}: {v}" for k, v in failures.items())
