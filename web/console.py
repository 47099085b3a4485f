"""The console pages: plain HTML, CSS and JavaScript served by Flask.

The page shell is a Jinja template (autoescaped); everything it shows is
fetched from the REST API and kept live over ``/ws`` by ``static/app.js``,
which writes data with ``textContent`` only.  The language (English or
Simplified Chinese) comes from the ``lang`` cookie set by the switch in the
page, else from the browser's ``Accept-Language``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, render_template

from web.auth import csrf_token, current_principal
from web.language import page_language

bp = Blueprint("console", __name__)

@bp.get("/")
def index() -> Any:
    principal = current_principal()
    if principal is None:
        return redirect("/login")
    return render_template("console.html", lang=page_language(), csrf=csrf_token(),
                           user=principal.user, role=principal.role.label)
