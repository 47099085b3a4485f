"""Coverage-guided fuzzing (atheris / libFuzzer) of the pure codecs that
meet untrusted input: the agent registration and event bodies, the
callback JSON, the control plane's JSON body guard, and the template
filters.  Run by tests/reliability/test_atheris.py as a subprocess with a
bounded budget::

    python tests/reliability/atheris_codecs.py TARGET -runs=N -max_total_time=S

A crash is any exception other than the documented refusal
(``ValidationError`` / ``ApiError`` 4xx / the filter's ``ValueError``);
libFuzzer then exits non-zero and prints the input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# third-party code is imported uninstrumented (fast start); ours is instrumented
import flask  # noqa: F401
import jinja2  # noqa: F401
import yaml  # noqa: F401

with atheris.instrument_imports(include=["bootsvc", "lpmos", "web"]):
    from bootsvc import render
    from bootsvc.http.routes_callback import parse_callback
    from bootsvc.state.registration import parse_register
    from lpmos.models import ProgressEvent, ValidationError
    from web.http import ApiError, json_depth, parse_json_body


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return data.decode("utf-8", "replace")


def agent(data: bytes) -> None:
    body = _json(data)
    for fn in (parse_register, ProgressEvent.from_dict,
               lambda b: parse_callback(b, now=1.7e9)):
        try:
            fn(body)
        except ValidationError:
            pass


def web_json(data: bytes) -> None:
    depth = json_depth(data)
    try:
        parse_json_body(data)
    except ApiError as exc:
        assert 400 <= exc.status < 500
        return
    assert depth <= 32


def filters(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    out = render.filter_ipxe(text)
    assert "\n" not in out and "${" not in out and " " not in out
    assert "\n" not in render.filter_ipxe_text(text)
    assert "\n" not in render.filter_ipxe_args(text)
    try:
        quoted = render.filter_shell(text)
    except ValueError:
        return
    assert "\n" not in quoted


TARGETS: dict[str, Callable[[bytes], None]] = {"agent": agent, "web_json": web_json,
                                               "filters": filters}

if __name__ == "__main__":
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()
