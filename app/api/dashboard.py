"""/dashboard: the operator's page, and its login.

The page draws `take_snapshot()` (the same numbers as `dreamq status` and /metrics) and redraws it
every few seconds from /v1/admin/status, so it needs no other query and cannot disagree with them.

Who may see it: an admin. A browser logs in once with an admin API key at /dashboard/login and
gets a signed, HttpOnly, SameSite=Strict session cookie that holds only the id of that key; every
request re-checks the key (revoked, demoted or disabled ends the session at once). The cookie is
honoured only by the page and by admin GET routes that declare `session_auth` (app/api/routing.py):
it never authorizes a write. `Authorization: Bearer <admin key>` opens the page too (scripts, a
proxy that injects it). Login and logout are public routes with their own checks: a same-origin
test against cross-site posts and, for login, the key itself.
"""

from __future__ import annotations

import datetime as dt
import secrets
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, make_response, redirect, render_template, request, session

from app.api.auth import SESSION_KEY_ID, principal_for_key
from app.api.routing import Context, endpoint
from app.core.errors import Forbidden, Unauthorized
from app.observability.snapshot import take_snapshot

bp = Blueprint("dashboard", __name__, template_folder="templates")

LOGIN = "/dashboard/login"
# How often the page redraws from /v1/admin/status.
REFRESH_MS = 3000


def configure_sessions(app, settings) -> None:
    """Cookie settings for the dashboard login (called by create_app)."""
    app.secret_key = settings.secret_key or None
    app.config.update(
        SESSION_COOKIE_NAME="dreamq_dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=settings.dashboard_session_s),
    )


def _same_origin() -> bool:
    """A browser says where a POST comes from (Sec-Fetch-Site, Origin): refuse other sites.
    SameSite=Strict already keeps the cookie off cross-site requests; this also stops a page
    elsewhere from logging a victim's browser into the attacker's session."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def _html(body: str, status: int = 200, nonce: str = "") -> Response:
    response = make_response(body, status)
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    # No CDN, no inline code but ours (nonce); scripts may only call back to this origin.
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _render(template: str, status: int = 200, **context) -> Response:
    nonce = secrets.token_urlsafe(16)
    return _html(render_template(template, nonce=nonce, **context), status, nonce)


def _login_page(error: str | None = None, status: int = 200) -> Response:
    return _render("dashboard/login.html", status, error=error, enabled=bool(current_app.secret_key))


@endpoint(
    bp,
    "/dashboard",
    methods=["GET"],
    auth="admin",
    session_auth=True,
    login_redirect=LOGIN,
    summary="Operator dashboard (HTML)",
)
def dashboard(ctx: Context):
    snapshot = take_snapshot(ctx.session).to_dict()
    return _render(
        "dashboard/dashboard.html",
        snapshot=snapshot,
        who=ctx.user.user_name,
        via_session=SESSION_KEY_ID in session,
        refresh_ms=REFRESH_MS,
    )


@endpoint(bp, LOGIN, methods=["GET"], auth="public", html=True, summary="Dashboard login form (HTML)")
def login_form(ctx: Context):
    return _login_page()


@endpoint(
    bp,
    LOGIN,
    methods=["POST"],
    auth="public",
    html=True,
    summary="Check an admin API key and start a dashboard session (HTML form post)",
)
def login_submit(ctx: Context):
    if not _same_origin():
        return _login_page("Cross-site login refused.", 403)
    if not current_app.secret_key:
        return _login_page(None, 503)
    try:
        principal = principal_for_key(ctx.session, request.form.get("key", "").strip(), "admin")
    except Unauthorized:
        return _login_page("That key is not valid, or has been revoked.", 401)
    except Forbidden:
        return _login_page("That key has no admin scope.", 403)
    session.clear()
    session[SESSION_KEY_ID] = str(principal.key_id)
    session.permanent = True
    return redirect("/dashboard", code=303)


@endpoint(
    bp,
    "/dashboard/logout",
    methods=["POST"],
    auth="public",
    html=True,
    summary="End the dashboard session (HTML form post)",
    transactional=False,
)
def logout(ctx: None):
    if not _same_origin():
        return _login_page("Cross-site logout refused.", 403)
    if current_app.secret_key:  # without one there is no session to end
        session.clear()
    return redirect(LOGIN, code=303)
