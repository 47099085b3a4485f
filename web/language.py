"""The console's language: English or Simplified Chinese."""

from __future__ import annotations

from flask import request

LANGUAGES = ("en", "zh")


def page_language() -> str:
    """``en`` or ``zh``: the ``lang`` cookie, else the best Accept-Language match."""
    cookie = request.cookies.get("lang", "")
    if cookie in LANGUAGES:
        return cookie
    best = request.accept_languages.best_match(["en", "zh", "zh-CN", "zh-Hans", "zh-TW"],
                                               default="en")
    return "zh" if best and best.startswith("zh") else "en"
