"""Fixtures the Dream Machine client tests share (Python's `lumaai` and the npm `lumaai`).

Module-scoped: each test module gets its own gunicorn API on the session's services and workers.
"""

from __future__ import annotations

import pytest
import requests

from tests.support.factories import auth
from tests.support.stack import gunicorn_api


@pytest.fixture(scope="module")
def api_url(stack_env, workers, tmp_path_factory):
    with gunicorn_api(stack_env, tmp_path_factory.mktemp("dream-machine-api") / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def admin(api_url, stack_env):
    from tests.support.factories import create_user

    return auth(create_user("api", scopes=("user", "admin"))[1])


@pytest.fixture(scope="module")
def mapped(api_url, admin, demo_model, tiny_model):
    """ray-2 -> the demo model, ray-flash-2 -> tiny (which fails on 'please explode')."""
    for name, model in (("ray-2", "demo"), ("ray-flash-2", "tiny")):
        response = requests.put(
            f"{api_url}/v1/admin/dream-machine/models/{name}", json={"model": model}, headers=admin, timeout=10
        )
        assert response.status_code == 200, response.text
