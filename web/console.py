"""The console pages: plain HTML, CSS and JavaScript served by Flask.

The page shell is a Jinja template (autoescaped); everything it shows is
fetched from the REST API and kept live over ``/ws`` by ``static/app.js``,
which writes data with ``textContent`` only.  The language (English or
Simplified Chinese) comes from the ``lang`` cookie set by the switch in the
page, else from the browser's ``Accept-Language``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, render_template, request

from web.auth import csrf_token, current_principal

bp = Blueprint("console", __name__)

LANGUAGES = ("en", "zh")


def page_language() -> str:
    """``en`` or ``zh``: the ``lang`` cookie, else the best Accept-Language match."""
    cookie = request.cookies.get("lang", "")
    if cookie in LANGUAGES:
        return cookie
    best = request.accept_languages.best_match(["en", "zh", "zh-CN", "zh-Hans", "zh-TW"],
                                               default="en")
    return "zh" if best and best.startswith("zh") else "en"


@bp.get("/")
def index() -> Any:
    principal = current_principal()
    if principal is None:
        return redirect("/login")
    return render_template("console.html", lang=page_language(), csrf=csrf_token(),
                           user=principal.user, role=principal.role.label)
