"""/dashboard in a real browser: Debian's headless Chromium, driven by Selenium, against gunicorn.

A running stack (real workers) holds jobs in several tiers: queued on `parked` (a pool with no
worker, so they stay queued), finished on `tiny`, one failed ("please explode"). The test logs in
through the form with an admin key, reads every number the page shows from its data-* attributes,
and checks them against its own queries of Postgres (not against take_snapshot(), which drew the
page); then it changes the database and watches the page follow without a reload, and saves a
screenshot (path printed; copied to bench/results/dashboard.png when DREAMQ_SAVE_SCREENSHOT=1).

Only the system browser is used: the driver path is given explicitly, so Selenium Manager never
runs and nothing is downloaded. Without /usr/bin/chromium or /usr/bin/chromedriver the test skips
and names the package to install, or fails so under CI=true (tests.support.system_deps): `make
system-packages` installs both.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from app.db.session import transaction
from app.jobs.workers import WORKER_STALE_S
from tests.support.factories import auth, create_user
from tests.support.stack import gunicorn_api
from tests.support.system_deps import missing

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("DREAMQ_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DREAMQ_CHROMEDRIVER", "/usr/bin/chromedriver")
TERMINAL = ("succeeded", "failed", "cancelled")
# The page redraws every 3 s; a number must follow the database within a few redraws.
FOLLOW_S = 20
# The dispatch limit tests/conftest.py's parked_model fixture gives local.parked.
PARKED_LIMIT = 2

pytestmark = pytest.mark.slow


def _require_browser() -> None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            missing(
                f"{path} not found (this test never downloads a browser)",
                install=f"apt-get install {package} (`make system-packages` does, as root)",
            )


@pytest.fixture(scope="module")
def server(stack_env, tmp_path_factory):
    """gunicorn with two workers sharing DREAMQ_SECRET_KEY: a login made on one is honoured by the other."""
    _require_browser()
    log = tmp_path_factory.mktemp("dashboard-api") / "api.log"
    with gunicorn_api(stack_env, log, threads=2, extra_env={"DREAMQ_SECRET_KEY": secrets.token_urlsafe(32)}) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    # An explicit driver path: Selenium Manager (which would download one) is never consulted.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = condition()
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def log_in(driver, base: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/dashboard/login")
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "login-submit").click()


# --- what the page says, what the database says ------------------------------------------------

READ_DOM = """
const rows = (sel) => Array.from(document.querySelectorAll(sel)).map(r => Object.assign({}, r.dataset));
return {
  taken_at: document.getElementById('taken-at').dataset.takenAt,
  tiers: rows('#tiers tr[data-tier]'), pools: rows('#pools tr[data-pool]'),
  workers: rows('#workers tr[data-worker]'), failures: rows('#failures tr[data-failure]'),
  loaded: Object.fromEntries(Array.from(document.querySelectorAll('#workers tr[data-worker]'))
            .map(r => [r.dataset.worker, r.querySelector('td.loaded').textContent])),
  total_queued: document.getElementById('total-queued').textContent,
};
"""


def page_numbers(driver) -> dict:
    dom = driver.execute_script(READ_DOM)
    return {
        "tiers": {t["tier"]: (int(t["queued"]), int(t["dispatched"]), int(t["running"])) for t in dom["tiers"]},
        "pools": {
            p["pool"]: (int(p["dispatchLimit"]), int(p["liveWorkers"]), int(p["dispatched"]), int(p["running"]))
            for p in dom["pools"]
        },
        "workers": {w["worker"]: w["state"] for w in dom["workers"]},
        "failures": [(f["failure"], f["code"]) for f in dom["failures"]],
    }


def database_numbers() -> dict:
    """The same picture, from queries written here (not snapshot.py's)."""
    with transaction() as session:
        tiers = session.execute(
            text(
                "SELECT t.name, count(j.id) FILTER (WHERE j.state = 'queued'), count(j.id) FILTER (WHERE j.state = 'dispatched'),"
                " count(j.id) FILTER (WHERE j.state = 'running') FROM tiers t LEFT JOIN jobs j ON j.tier = t.name GROUP BY t.name"
            )
        )
        pools = session.execute(
            text(
                "SELECT c.name || '.' || m.name, p.dispatch_limit,"
                " (SELECT count(*) FROM workers w WHERE w.pool_id = p.id AND w.state IN ('idle', 'busy')"
                "    AND w.heartbeat_at > now() - make_interval(secs => :stale)),"
                " (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'dispatched'),"
                " (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'running')"
                " FROM pools p JOIN clusters c ON c.id = p.cluster_id JOIN models m ON m.id = p.model_id"
            ),
            {"stale": WORKER_STALE_S},
        )
        workers = session.execute(text("SELECT id, state FROM workers WHERE heartbeat_at > now() - interval '1 hour'"))
        failures = session.execute(
            text(
                "SELECT id::text, failure_code FROM jobs WHERE state = 'failed' AND finished_at > now() - interval '1 day'"
                " ORDER BY finished_at DESC LIMIT 20"
            )
        )
        return {
            "tiers": {name: (q, d, r) for name, q, d, r in tiers},
            "pools": {name: (limit, live, d, r) for name, limit, live, d, r in pools},
            "workers": dict(workers.all()),
            "failures": [(i, c or "") for i, c in failures],
        }


def page_matches_database(driver) -> bool | tuple:
    page, db = page_numbers(driver), database_numbers()
    return True if page == db else (page, db)


# --- jobs over HTTP, as clients make them --------------------------------------------------------


def submit(base: str, key: str, model: str, prompt: str = "a red circle moving right", **params) -> str:
    response = requests.post(
        f"{base}/v1/generations", json={"prompt": prompt, "model": model, **params}, headers=auth(key), timeout=30
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_terminal(base: str, key: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = requests.get(
            f"{base}/v1/generations/{job_id}", headers={**auth(key), "Prefer": "wait=5"}, timeout=30
        ).json()
        if job["state"] in TERMINAL:
            return job
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {job}")


def backdate(job_id: str, seconds: float) -> None:
    """Make a queued job look older, so the tiers show green, amber and red bars."""
    with transaction() as session:
        session.execute(
            text("UPDATE jobs SET created_at = now() - make_interval(secs => :s) WHERE id = :id"),
            {"s": seconds, "id": job_id},
        )


def set_parked_limit(limit: int) -> None:
    with transaction() as session:
        session.execute(
            text(
                "UPDATE pools SET dispatch_limit = :limit WHERE model_id = (SELECT id FROM models WHERE name = 'parked')"
                " AND cluster_id = (SELECT id FROM clusters WHERE name = 'local')"
            ),
            {"limit": limit},
        )


# --- the tests -------------------------------------------------------------------------------------


def test_logged_out_visitors_and_non_admin_keys_get_the_login_form(browser, server, make_user):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(server + "/dashboard")
    assert browser.current_url == server + "/dashboard/login"
    _, user_key = make_user("api")
    log_in(browser, server, user_key)
    error = wait_for(lambda: browser.find_element(By.ID, "login-error").text, 10, "the login error")
    assert "no admin scope" in error
    assert browser.get_cookie("dreamq_dashboard") is None
    browser.get(server + "/dashboard")
    assert browser.current_url == server + "/dashboard/login"


def test_the_dashboard_shows_what_the_database_holds_and_follows_it(
    browser, server, workers, parked_model, tiny_model, tmp_path
):
    from selenium.webdriver.common.by import By

    _, admin_key = create_user("api", scopes=("admin",))
    users = {tier: create_user(tier)[1] for tier in ("api", "enterprise", "light", "free")}
    parked: list[tuple[str, str]] = []  # (tier, job id): cancelled at the end
    try:
        # Queued for good (parked has a pool and no worker), aged to give each tier its colour:
        # api past W (red), enterprise past W/2 (amber), light and free well within (green).
        for tier, count, age in (("api", 3, 90), ("enterprise", 2, 75), ("light", 1, 200), ("free", 4, 2400)):
            for i in range(count):
                job_id = submit(server, users[tier], "parked")
                parked.append((tier, job_id))
                backdate(job_id, age * (1 - i / 10))
        # Run on tiny: two succeed, one fails with the model's own error.
        done = [submit(server, users["enterprise"], "tiny"), submit(server, users["api"], "tiny")]
        exploded = submit(server, users["api"], "tiny", prompt="please explode")
        assert [
            wait_terminal(server, users["enterprise"], done[0])["state"],
            wait_terminal(server, users["api"], done[1])["state"],
        ] == ["succeeded", "succeeded"]
        failed = wait_terminal(server, users["api"], exploded)
        assert failed["state"] == "failed" and failed["failure"]["code"] == "model_error"

        log_in(browser, server, admin_key)
        wait_for(lambda: browser.current_url == server + "/dashboard", 15, "the redirect to /dashboard")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#tiers tr[data-tier]"), 15, "the tiers to render")
        cookie = browser.get_cookie("dreamq_dashboard")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie

        # Every number on the page equals the database's (the system is quiet: nothing runs).
        wait_for(lambda: page_matches_database(browser) is True, FOLLOW_S, "the page to match the database")
        dom = browser.execute_script(READ_DOM)
        tiers = {t["tier"]: t for t in dom["tiers"]}
        assert {"api", "enterprise", "unlimited", "light", "free"} <= tiers.keys()
        for name in ("api", "enterprise", "light", "free"):
            assert int(tiers[name]["queued"]) >= sum(1 for tier, _ in parked if tier == name)
        bar_levels = browser.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#tiers tr[data-tier]'))"
            ".map(r => [r.dataset.tier, r.querySelector('.bar .fill').className]))"
        )
        assert float(tiers["api"]["urgency"]) >= 1.0 and "bad" in bar_levels["api"]
        assert "ok" in bar_levels["light"] and float(tiers["light"]["urgency"]) < 0.5
        pools = {p["pool"]: p for p in dom["pools"]}
        assert pools["local.parked"]["liveWorkers"] == "0" and pools["local.parked"]["effectiveLimit"] == "0"
        assert pools["local.tiny"]["dispatchLimit"] == "4" and int(pools["local.tiny"]["liveWorkers"]) >= 1
        tiny_workers = [w for w in dom["workers"] if w["pool"] == "local.tiny"]
        assert tiny_workers and all(w["state"] in ("idle", "busy") and w["stale"] == "false" for w in tiny_workers)
        assert any(f"tiny v{tiny_model['version']}" in dom["loaded"][w["worker"]] for w in tiny_workers)
        failures = {f["failure"]: f for f in dom["failures"]}
        assert failures[exploded]["code"] == "model_error" and failures[exploded]["model"] == "tiny"
        assert failures[exploded]["tier"] == "api"
        assert "exploded on purpose" in browser.find_element(By.CSS_SELECTOR, f'tr[data-failure="{exploded}"]').text

        # The page follows the database by itself: no reload (the marker would vanish).
        browser.execute_script("window.__notReloaded = true")
        before = dom["taken_at"]
        parked.append(("light", submit(server, users["light"], "parked")))
        set_parked_limit(3)
        wait_for(lambda: page_numbers(browser)["pools"]["local.parked"][0] == 3, FOLLOW_S, "the new limit on the page")
        wait_for(lambda: page_matches_database(browser) is True, FOLLOW_S, "the page to match the database again")
        assert browser.execute_script("return window.__notReloaded === true")
        assert browser.execute_script(READ_DOM)["taken_at"] != before

        # Work in flight for the picture: tiny jobs of 64 frames (~3 s each at 50 ms a step) from
        # two tiers, so the tiny pool shows running and dispatched jobs and its worker is busy.
        busy = {tier: create_user(tier)[1] for tier in ("unlimited", "enterprise")}
        for i in range(6):
            tier = ("unlimited", "enterprise")[i % 2]
            parked.append((tier, submit(server, busy[tier], "tiny", num_frames=64)))
        users.update(busy)
        wait_for(
            lambda: page_numbers(browser)["pools"]["local.tiny"][3] >= 1, FOLLOW_S, "a running tiny job on the page"
        )
        path = save_screenshot(browser, tmp_path / "dashboard.png")
        print(f"\ndashboard screenshot: {path}")
        if os.environ.get("DREAMQ_SAVE_SCREENSHOT") == "1":
            saved = ROOT / "bench" / "results" / "dashboard.png"
            saved.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, saved)
            print(f"dashboard screenshot copied to {saved}")

        # Logging out ends the session: the page sends the browser back to the form.
        browser.find_element(By.ID, "logout").click()
        wait_for(lambda: browser.current_url == server + "/dashboard/login", 10, "the login form after logout")
        browser.get(server + "/dashboard")
        assert browser.current_url == server + "/dashboard/login"
    finally:
        set_parked_limit(PARKED_LIMIT)
        for tier, job_id in parked:
            requests.post(f"{server}/v1/generations/{job_id}/cancel", headers=auth(users[tier]), timeout=30)


def save_screenshot(driver, path: Path) -> Path:
    """The whole page, 1400 CSS px wide: the viewport is set to the page's height first."""
    height = driver.execute_script("return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1400, "height": max(1000, min(int(height), 4000)), "deviceScaleFactor": 1, "mobile": False},
    )
    time.sleep(0.3)
    try:
        assert driver.save_screenshot(str(path)), "Chromium returned no screenshot"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path
