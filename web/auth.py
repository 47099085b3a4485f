"""Authentication and authorization of the control plane.

Two ways in:

* ``Authorization: Bearer <token>`` with an API token from ``lpmos token
  create`` (scripts, curl).  No cookies are involved, so no CSRF check.
* A console session: ``POST /login`` with a user name and password (scrypt
  hashes in etcd, :mod:`lpmos.auth`), a signed session cookie (HttpOnly,
  SameSite=Lax).  Every mutating request on a session must carry the
  session's CSRF token in ``X-CSRF-Token`` (or the ``csrf_token`` form
  field) and, when the browser sends an ``Origin``, come from an allowed one.

Roles are ordered viewer < operator < approver < admin and re-read from etcd
on every request, so demoting a user takes effect at once.  Each view states
its minimum role with :func:`requires`; the decorator also marks the view
for the OpenAPI document and for the test that tries every mutating route
without a token and with a too-low role.

Rate limits: login attempts per client address and per user name, and
mutating calls per user; a refusal is 429 with ``Retry-After`` and counted.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
)

from lpmos.auth import Role, User, validate_username
from lpmos.models import ValidationError
from lpmos.store import StoreError
from web.context import ctx
from web.http import ApiError, parse_json_body
from web.language import page_language

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user, their role now, and how they came in."""

    user: str
    role: Role
    via: str            # "token" or "session"
    token_id: str = ""

    @property
    def source(self) -> str:
        return f"token {self.token_id}" if self.via == "token" else "console session"


def requires(role: Role, *, mutating: bool | None = None) -> Callable[[F], F]:
    """The view needs a principal of at least ``role``.

    ``mutating`` (default: the method is not GET/HEAD) adds the CSRF check
    for sessions and the per-user rate limit.  Marks the view with
    ``lpmos_role`` / ``lpmos_mutating`` for OpenAPI and the tests."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            is_mutating = mutating if mutating is not None else \
                request.method in MUTATING_METHODS
            principal = current_principal()
            if principal is None:
                raise ApiError(401, "unauthorized",
                               "authentication required: send 'Authorization: Bearer <token>' "
                               "(see 'lpmos token create') or log in to the console",
                               reason="unauthenticated")
            if principal.role < role:
                raise ApiError(403, "forbidden",
                               f"this needs the {role.label} role; {principal.user} is "
                               f"{principal.role.label}", reason="role")
            if is_mutating:
                if principal.via == "session":
                    check_csrf()
                limiter = ctx().mutate_limiter
                allowed, wait = limiter.allow(principal.user)
                if not allowed:
                    raise ApiError(429, "rate_limited",
                                   f"too many changes from {principal.user}; retry in "
                                   f"{wait:.0f} s", retry_after=round(wait, 1), reason="rate_limit")
            return fn(*args, **kwargs)

        wrapper.lpmos_role = role  # type: ignore[attr-defined]
        wrapper.lpmos_mutating = mutating  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate


def current_principal() -> Principal | None:
    """The authenticated caller of this request (memoized in ``g``)."""
    if "principal" in g:
        return cast(Principal | None, g.principal)
    principal = _authenticate()
    g.principal = principal
    return principal


def _authenticate() -> Principal | None:
    auth = ctx().auth
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "Authorization must be 'Bearer <token>'",
                           reason="bad_authorization_header")
        token = token.strip()
        try:
            user = auth.verify_token(token)
        except StoreError as exc:
            raise ApiError(503, "unavailable", f"cannot check the token: {exc}") from None
        if user is None:
            raise ApiError(401, "unauthorized", "the API token is unknown or revoked",
                           reason="bad_token")
        from lpmos.auth import token_digest

        return Principal(user.name, user.level, "token", token_digest(token)[:12])
    name = session.get("user")
    if not isinstance(name, str):
        return None
    lifetime = float(ctx().setting("web.session_hours", 12.0)) * 3600
    started = session.get("t")
    if not isinstance(started, int | float) or time.time() - started > lifetime:
        session.clear()
        return None
    try:
        user = auth.get_user(name)
    except StoreError as exc:
        raise ApiError(503, "unavailable", f"cannot check the session's user: {exc}") from None
    if user is None or user.disabled:
        session.clear()
        return None
    return Principal(user.name, user.level, "session")


def csrf_token() -> str:
    """This session's CSRF token (created on first use)."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def allowed_origins() -> set[str]:
    own = f"{request.scheme}://{request.host}"
    return {own, *ctx().setting("web.allowed_origins", [])}


def origin_allowed(origin: str | None) -> bool:
    """No Origin (curl, same-origin GET) is allowed; otherwise it must be ours
    or listed in ``web.allowed_origins``."""
    if not origin:
        return True
    parts = urlsplit(origin)
    normalized = f"{parts.scheme}://{parts.netloc}"
    return normalized in allowed_origins()


def check_csrf() -> None:
    if not origin_allowed(request.headers.get("Origin")):
        raise ApiError(403, "forbidden", "cross-origin request refused", reason="origin")
    sent = request.headers.get("X-CSRF-Token", "")
    if not sent and request.mimetype == "application/x-www-form-urlencoded":
        sent = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not isinstance(expected, str) or not sent or \
            not hmac.compare_digest(sent.encode(), expected.encode()):
        raise ApiError(403, "csrf", "missing or wrong CSRF token; reload the console",
                       reason="csrf")


def client_address() -> str:
    return request.remote_addr or "unknown"


def login_user(name: str, password: str) -> User:
    """Check a password under the login rate limits; raises :class:`ApiError`."""
    limiter = ctx().login_limiter
    for key in (f"ip:{client_address()}", f"user:{name}"):
        allowed, wait = limiter.allow(key)
        if not allowed:
            raise ApiError(429, "rate_limited", f"too many login attempts; retry in {wait:.0f} s",
                           retry_after=round(wait, 1), reason="login_rate_limit")
    try:
        validate_username(name)
    except ValidationError:
        raise ApiError(401, "unauthorized", "wrong user name or password",
                       reason="login_failed") from None
    if not isinstance(password, str) or len(password) > 1024:
        raise ApiError(401, "unauthorized", "wrong user name or password")
    try:
        user = ctx().auth.check_password(name, password)
    except StoreError as exc:
        raise ApiError(503, "unavailable", f"cannot check the password: {exc}") from None
    if user is None:
        raise ApiError(401, "unauthorized", "wrong user name or password", reason="login_failed")
    return user


def _start_session(user: User) -> None:
    session.clear()
    session.permanent = True
    session["user"] = user.name
    session["t"] = time.time()
    session["csrf"] = secrets.token_urlsafe(32)
    g.principal = Principal(user.name, user.level, "session")


@bp.get("/login")
def login_page() -> Any:
    return render_template("login.html", csrf=csrf_token(), lang=page_language(), error="")


@bp.post("/login")
def login() -> Any:
    """Form login from the console page (CSRF-checked), or JSON ``{"user",
    "password"}`` for scripts, which answers ``{"user", "role", "csrf"}``."""
    is_form = request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data")
    if is_form:
        if not origin_allowed(request.headers.get("Origin")):
            raise ApiError(403, "forbidden", "cross-origin login refused")
        sent = request.form.get("csrf_token", "")
        expected = session.get("csrf")
        if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(),
                                                                    expected.encode()):
            ctx().metrics.inc("web_refused_total", reason="csrf")
            return render_template("login.html", csrf=csrf_token(), lang=page_language(),
                                   error="csrf"), 403
        name, password = request.form.get("user", ""), request.form.get("password", "")
        try:
            user = login_user(name, password)
        except ApiError as exc:
            ctx().metrics.inc("web_refused_total", reason=exc.reason)
            return render_template("login.html", csrf=csrf_token(), lang=page_language(),
                                   error=exc.error, user=name), exc.status
        _start_session(user)
        return redirect("/")
    body = parse_json_body(request.get_data(cache=True))
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "send {\"user\": ..., \"password\": ...}")
    user = login_user(str(body.get("user", "")), body.get("password", ""))
    _start_session(user)
    return jsonify({"user": user.name, "role": user.role, "csrf": session["csrf"]})


@bp.post("/logout")
def logout() -> Response:
    if session.get("user"):
        check_csrf()
    session.clear()
    if request.mimetype == "application/x-www-form-urlencoded":
        return cast(Response, redirect("/login"))
    return jsonify({"ok": True})


@bp.get("/api/v1/session")
def whoami() -> Any:
    """The caller, their role and (for sessions) the CSRF token."""
    principal = current_principal()
    if principal is None:
        raise ApiError(401, "unauthorized", "not logged in")
    body: dict[str, Any] = {"user": principal.user, "role": principal.role.label,
                            "via": principal.via,
                            "four_eyes": bool(ctx().setting("web.four_eyes", False))}
    if principal.via == "session":
        body["csrf"] = csrf_token()
    return jsonify(body)
