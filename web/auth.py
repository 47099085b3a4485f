"""Authentication and authorization of the control plane.

Two ways in:

* ``Authorization: Bearer <token>`` with an API token from ``lpmos token
  create`` (scripts, curl).  No cookies are involved, so no CSRF check.
* A console session: ``POST /login`` with a user name and password (scrypt
  hashes in etcd, :mod:`lpmos.auth`), a signed session cookie (HttpOnly,
  SameSite=Lax).  Every mutating request on a session must carry the
  session's CSRF token in ``X-CSRF-Token`` (or the ``csrf_token`` form
  field) and, when the browser sends an ``Origin``, come from an allowed one.

Users are local (a password hash in etcd) or, when ``web.ldap_url`` is set,
directory users (:mod:`web.ldap`): sign-in tries the local user first and
the directory only for a name no local user has.  A directory user's role
comes from their groups and is re-checked against the directory at most
every ``web.ldap_recheck`` seconds, for sessions and API tokens alike; a
user the directory no longer admits is refused with the reason, and while
the directory cannot be reached their last role serves reads only (changes
get 503).  A signed-in user may mint API tokens for themselves
(``POST /api/v1/session/tokens``), the way a directory user gets one.

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
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
)
from flask.blueprints import BlueprintSetupState

from lpmos.audit import Auditor
from lpmos.auth import Role, TokenRecord, User, token_digest, validate_username
from lpmos.models import ValidationError, validate_text
from lpmos.store import Op, StoreError
from web.context import WebContext, ctx
from web.http import ApiError, parse_json_body
from web.language import page_language
from web.ldap import (
    Directory,
    DirectoryAccess,
    DirectoryUnavailable,
    InvalidCredentials,
    LdapSettings,
    Refused,
    RoleCheck,
)

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user, their role now, and how they came in.
    ``user_source`` is the user's (``local`` or ``ldap``); ``stale`` says
    the role is a directory user's last confirmed one, kept for reads while
    the directory cannot be reached (``stale_detail`` says why)."""

    user: str
    role: Role
    via: str            # "token" or "session"
    token_id: str = ""
    user_source: str = "local"
    stale: bool = False
    stale_detail: str = ""

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
                if principal.stale:
                    raise ApiError(503, "directory_unavailable",
                                   f"changes are refused until the directory confirms "
                                   f"{principal.user}'s groups: {principal.stale_detail}",
                                   reason="directory_stale")
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
        token_id = token_digest(token)[:12]
        if user.source != "local":
            return _directory_principal(user, "token", token_id)
        return Principal(user.name, user.level, "token", token_id)
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
    if user.source != "local":
        return _directory_principal(user, "session")
    return Principal(user.name, user.level, "session")


def directory_access() -> DirectoryAccess | None:
    """This app's LDAP sign-in, ``None`` when ``web.ldap_url`` is empty."""
    access: DirectoryAccess | None = current_app.extensions.get("lpmos_ldap")
    return access


@bp.record_once
def _set_up_directory(state: BlueprintSetupState) -> None:
    """Build the app's directory client from its settings when the
    blueprint is registered (``create_app`` registers it after making the
    WebContext); a bad combination of ``web.ldap_*`` settings fails here."""
    context: WebContext = state.app.extensions["lpmos"]
    settings = LdapSettings.from_values(context.settings)
    state.app.extensions["lpmos_ldap"] = None if settings is None else DirectoryAccess(
        Directory(settings), settings, context.auth, context.keys)


def _directory_principal(user: User, via: str, token_id: str = "") -> Principal | None:
    """A directory user's principal: their role re-checked when due
    (:meth:`DirectoryAccess.role_of`).  A refusal is 401 with the reason for
    a token, and ends a session (``None``)."""
    access = directory_access()
    if access is None:
        raise ApiError(401, "unauthorized", f"{user.name} is a directory ({user.source}) user "
                                            "and LDAP sign-in is not configured here",
                       reason="directory_off")
    try:
        check: RoleCheck = access.role_of(user)
    except Refused as exc:
        if via == "session":    # signed out: the console shows the sign-in page again,
            session.clear()     # where signing in says why
            return None
        raise ApiError(401, "unauthorized", f"the directory refused access: {exc}",
                       reason="directory_refused") from None
    except DirectoryUnavailable as exc:
        raise ApiError(503, "directory_unavailable", str(exc),
                       reason="directory_unavailable") from None
    except StoreError as exc:
        raise ApiError(503, "unavailable", f"cannot store the directory's answer: {exc}") \
            from None
    detail = ""
    if check.stale:
        detail = (f"the directory cannot be reached ({check.why}); {user.name}'s role was "
                  f"last confirmed at {_clock(check.checked_at)} and serves reads until "
                  f"{_clock(check.grace_until)}")
    return Principal(user.name, check.role, via, token_id, user_source=user.source,
                     stale=check.stale, stale_detail=detail)


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


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
    auth = ctx().auth
    try:
        user = auth.check_password(name, password)
        local = user or auth.get_user(name)
    except StoreError as exc:
        raise ApiError(503, "unavailable", f"cannot check the password: {exc}") from None
    if user is not None:
        return user
    access = directory_access()
    # the directory is asked only for a name that no local user holds
    if access is None or (local is not None and local.source == "local"):
        raise ApiError(401, "unauthorized", "wrong user name or password", reason="login_failed")
    if local is not None and local.disabled:
        raise ApiError(401, "unauthorized", "wrong user name or password", reason="login_failed")
    try:
        return access.sign_in(name, password, source=f"from {client_address()}")
    except InvalidCredentials:
        raise ApiError(401, "unauthorized", "wrong user name or password",
                       reason="login_failed") from None
    except Refused as exc:
        raise ApiError(403, "no_role", f"{exc}; ask an administrator to add you to one",
                       reason="no_role") from None
    except DirectoryUnavailable as exc:
        raise ApiError(503, "directory_unavailable", f"cannot sign in with the directory: "
                                                     f"{exc}",
                       reason="directory_unavailable") from None
    except StoreError as exc:
        raise ApiError(503, "unavailable", f"cannot record the sign-in: {exc}") from None


def _start_session(user: User) -> None:
    session.clear()
    session.permanent = True
    session["user"] = user.name
    session["t"] = time.time()
    session["csrf"] = secrets.token_urlsafe(32)
    session["source"] = user.source
    g.principal = Principal(user.name, user.level, "session", user_source=user.source)


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
                            "via": principal.via, "source": principal.user_source,
                            "four_eyes": bool(ctx().setting("web.four_eyes", False))}
    if principal.via == "session":
        body["csrf"] = csrf_token()
    if principal.stale:
        body["stale"] = principal.stale_detail
    return jsonify(body)


@bp.post("/api/v1/session/tokens")
@requires(Role.VIEWER)
def create_own_token() -> Any:
    """A new API token for the signed-in user (``{"label"?}``), shown once.
    Only a console session may ask (a token does not mint tokens); the
    token carries the user's role at each use, re-checked against the
    directory for a directory user."""
    principal = current_principal()
    assert principal is not None
    if principal.via != "session":
        raise ApiError(403, "forbidden", "sign in to the console (a session) to create your "
                                         "own API token; a token cannot create tokens",
                       reason="token_mints_token")
    raw = request.get_data(cache=True)
    body = parse_json_body(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    label = validate_text(body.get("label", ""), "label", 100)
    # web.audit.request_auditor's record (it imports this module, so not from there)
    auditor = Auditor(ctx().keys, principal.user, f"{principal.source} from "
                                                  f"{request.remote_addr}")

    def audit(created: TokenRecord) -> Op:
        return auditor.op("token.create", created.id,
                          after={"user": created.user, "label": created.label,
                                 "self_service": True})

    token, record = ctx().auth.create_token(principal.user, label=label, audit=audit)
    resp = jsonify({"token": token, "id": record.id, "user": record.user})
    resp.status_code = 201
    return resp
