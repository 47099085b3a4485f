"""The console's strings: every key app.js asks for by name is in both
languages of i18n.js, and every task state (with release's) has its badge
text, so a scheduled or released task never shows a raw key."""

from __future__ import annotations

import re
from pathlib import Path

from lpmos.states import TaskStatus

STATIC = Path(__file__).resolve().parents[2] / "web" / "static"


def _languages() -> dict[str, set[str]]:
    text = (STATIC / "i18n.js").read_text()
    zh = text.index("\n    zh: {")
    return {lang: set(re.findall(r'"([a-z0-9_]+\.[a-z0-9_.]+)":', part))
            for lang, part in (("en", text[:zh]), ("zh", text[zh:]))}


def test_every_literal_key_of_app_js_is_in_both_languages() -> None:
    used = set(re.findall(r'\bt\("([a-z0-9_]+\.[a-z0-9_.]+)"', (STATIC / "app.js").read_text()))
    assert {"schedule.section", "schedule.save", "schedule.not_before"} <= used
    # the action keys are built as act.{action}, title as {action}.title, done.{action}
    used |= {"act.release", "release.title", "release.warn", "done.release"}
    for lang, keys in _languages().items():
        assert used - keys == set(), lang


def test_every_task_state_has_its_badge_text() -> None:
    for lang, keys in _languages().items():
        missing = {s.value for s in TaskStatus} - {k.removeprefix("status.") for k in keys}
        assert missing == set(), lang
    app = (STATIC / "app.js").read_text()
    states = re.search(r"const STATES = \[(.*?)\];", app, re.S)
    assert states is not None
    assert set(re.findall(r'"([a-z]+)"', states.group(1))) == {s.value for s in TaskStatus}
