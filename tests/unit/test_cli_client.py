"""The API client's pure parts: the profiles file, exit codes, URLs, the
table and record rendering, and its flag parsers."""

from __future__ import annotations

import argparse
import builtins
import calendar
import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from lpmos import cli_client
from lpmos.cli_client import (
    UsageError,
    connect,
    format_cell,
    parse_param,
    parse_ref,
    parse_when,
    render_record,
    render_table,
    render_yaml,
)
from lpmos.client import (
    EXIT_AUTH,
    EXIT_CODES,
    EXIT_CONFLICT,
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    Profile,
    ProfileError,
    Profiles,
    exit_code_for_status,
    normalize_url,
    parse_profiles,
    profiles_path,
    read_profiles,
    render_profiles,
    write_profiles,
)

# -- profiles ------------------------------------------------------------------------


def test_profiles_file_is_written_0600_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "lpmos" / "profiles.toml"
    profiles = Profiles({"prod": Profile("prod", "https://cp.example:8080", "lpmos_abc"),
                         "lab": Profile("lab", "http://127.0.0.1:8080", 'q"uote\\d')},
                        default="prod")
    write_profiles(path, profiles)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_profiles(path) == profiles
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["profiles.toml"]


def test_profiles_rewrite_tightens_a_loose_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text("")
    path.chmod(0o644)
    write_profiles(path, Profiles({"a": Profile("a", "http://h:1", "t")}, "a"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_profiles_render_parses_as_toml_with_the_default() -> None:
    text = render_profiles(Profiles({"x.y-z": Profile("x.y-z", "http://h:1", "t\n")}, "x.y-z"))
    assert parse_profiles(text) == Profiles({"x.y-z": Profile("x.y-z", "http://h:1", "t\n")},
                                            "x.y-z")


def test_missing_profiles_file_is_empty(tmp_path: Path) -> None:
    assert read_profiles(tmp_path / "none.toml") == Profiles({})


@pytest.mark.parametrize("text, why", [
    ("[profiles", "not TOML"),
    ("default = 3", "'default'"),
    ("profiles = 1", "[profiles]"),
    ("[profiles.a]\ntoken = 'x'", "needs url"),
])
def test_bad_profiles_file_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ProfileError, match=why.replace("[", r"\[")):
        parse_profiles(text)


def test_profile_choice_default_only_one_and_errors() -> None:
    a, b = Profile("a", "http://a:1", "ta"), Profile("b", "http://b:1", "tb")
    assert Profiles({"a": a, "b": b}, "b").choose(None) == b
    assert Profiles({"a": a, "b": b}, "b").choose("a") == a
    assert Profiles({"a": a}).choose(None) == a
    with pytest.raises(ProfileError, match="lpmos login"):
        Profiles({}).choose(None)
    with pytest.raises(ProfileError, match="pass --profile"):
        Profiles({"a": a, "b": b}).choose(None)
    with pytest.raises(ProfileError, match="no profile named 'c'"):
        Profiles({"a": a}).choose("c")


def test_profiles_path_from_environment(tmp_path: Path) -> None:
    assert profiles_path({"LPMOS_CLIENT_CONFIG": "/x/p.toml"}) == Path("/x/p.toml")
    assert profiles_path({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/lpmos/profiles.toml")
    assert profiles_path({}).parts[-3:] == (".config", "lpmos", "profiles.toml")


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"url": None, "token": None, "profile": None,
                                 "timeout": None, **kw})


def test_connect_flags_and_environment_over_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    write_profiles(path, Profiles({"a": Profile("a", "http://a:1", "ta"),
                                   "b": Profile("b", "http://b:2/", "tb")}, "a"))
    env = {"LPMOS_CLIENT_CONFIG": str(path)}
    c = connect(_args(), env)
    assert (c.base_url, c.token, c.timeout) == ("http://a:1", "ta", 10.0)
    c = connect(_args(profile="b", timeout=3.0), env)
    assert (c.base_url, c.token, c.timeout) == ("http://b:2", "tb", 3.0)
    c = connect(_args(token="flag"), dict(env, LPMOS_PROFILE="b"))
    assert (c.base_url, c.token) == ("http://b:2", "flag")
    c = connect(_args(), dict(env, LPMOS_API_URL="http://e:3", LPMOS_API_TOKEN="te"))
    assert (c.base_url, c.token) == ("http://e:3", "te")       # the file is not read
    with pytest.raises(UsageError, match="--timeout"):
        connect(_args(timeout=0.0), env)


# -- exit codes and URLs ------------------------------------------------------------


@pytest.mark.parametrize("status, code", [
    (400, EXIT_INVALID), (401, EXIT_AUTH), (403, EXIT_AUTH), (404, EXIT_NOT_FOUND),
    (409, EXIT_CONFLICT), (413, EXIT_INVALID), (422, EXIT_INVALID), (429, EXIT_UNAVAILABLE),
    (500, EXIT_UNAVAILABLE), (503, EXIT_UNAVAILABLE), (504, EXIT_UNAVAILABLE),
    (418, EXIT_FAILURE),
])
def test_exit_code_of_each_status(status: int, code: int) -> None:
    assert exit_code_for_status(status) == code


def test_exit_codes_are_distinct() -> None:
    codes = [c for c, _ in EXIT_CODES]
    assert len(set(codes)) == len(codes) and 2 in codes


@pytest.mark.parametrize("given, base", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://cp.example/", "https://cp.example"),
    ("http://h:1/api/v1/", "http://h:1"),
    ("https://h/lpmos/api/v1", "https://h/lpmos"),
])
def test_normalize_url(given: str, base: str) -> None:
    assert normalize_url(given) == base


@pytest.mark.parametrize("bad", ["127.0.0.1:8080", "ftp://h/", "http://", "http://h/?x=1"])
def test_normalize_url_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(bad)


# -- rendering ----------------------------------------------------------------------


def test_table_aligns_columns_and_formats_cells() -> None:
    rows = [{"sn": "a", "at": 0.0, "ok": True, "tags": ["x", "y"], "n": None},
            {"sn": "long-serial", "at": 1767225600.0, "ok": False, "tags": [], "n": 3}]
    text = render_table(rows, [("SN", "sn"), ("AT (UTC)", "at"), ("OK", "ok"),
                               ("TAGS", "tags"), ("N", lambda r: r["n"])])
    assert text.splitlines() == [
        "SN           AT (UTC)             OK   TAGS  N",
        "a            -                    yes  x, y  -",
        "long-serial  2026-01-01 00:00:00  no   -     3",
    ]


def test_table_of_nothing_is_its_header() -> None:
    assert render_table([], [("IDC", "idc"), ("SN", "sn")]) == "IDC  SN\n"


def test_table_cuts_wide_cells_but_the_last_and_keeps_one_line() -> None:
    rows = [{"a": "x" * 100, "b": "two\nlines " + "y" * 60}]
    _header, second = render_table(rows, [("A", "a"), ("B", "b")]).splitlines()
    assert second.startswith("x" * 47 + "…  two lines y")
    assert second.endswith("y" * 60)


@pytest.mark.parametrize("value, key, shown", [
    (None, "", "-"), ("", "", "-"), (True, "", "yes"), (1.5, "", "1.5"),
    (1767225600, "created_at", "2026-01-01 00:00:00"), (0, "finished_at", "-"),
    (1767225600, "last_seen", "2026-01-01 00:00:00"), (7, "attempt", "7"),
    ({"a": 1}, "", '{"a":1}'), ([{"a": 1}], "", '[{"a":1}]'),
])
def test_format_cell(value: Any, key: str, shown: str) -> None:
    assert format_cell(value, key) == shown


def test_record_puts_first_keys_first_dots_nested_and_tables_lists() -> None:
    data = {"status": "pending", "idc": "dc1", "progress": {"percent": 5, "step": "write"},
            "history": [{"to_status": "pending", "by": "alice"}], "schema": 1,
            "logs": ["l1", "l2", "l3", "l4"]}
    text = render_record(data, first=("idc",), skip=("schema",))
    assert text == ("idc:              dc1\n"
                    "status:           pending\n"
                    "progress.percent: 5\n"
                    "progress.step:    write\n"
                    "\nhistory:\n  TO_STATUS  BY\n  pending    alice\n"
                    "\nlogs:\n  l1\n  l2\n  l3\n  l4\n")


def test_yaml_output_and_its_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    data = [{"sn": "a", "tags": ["x"]}]
    assert yaml.safe_load(render_yaml(data)) == data
    real_import = builtins.__import__

    def no_yaml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "yaml":
            raise ImportError("No module named 'yaml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    with pytest.raises(UsageError, match="--output json works without it"):
        render_yaml(data)


def test_emit_json_is_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    cli_client.emit(cli_client.Shown({"a": [1]}, "ignored"), "json")
    assert json.loads(capsys.readouterr().out) == {"a": [1]}
    cli_client.emit(cli_client.Shown({"a": [1]}, "the table"), "table")
    assert capsys.readouterr().out == "the table\n"


# -- flag parsers ---------------------------------------------------------------------


def test_parse_ref() -> None:
    assert parse_ref("dc1/SN-1") == ("dc1", "SN-1")
    for bad in ("dc1", "/sn", "dc1/", "a/b/c"):
        with pytest.raises(UsageError, match="IDC/SN"):
            parse_ref(bad)


def test_parse_param_json_or_text() -> None:
    assert parse_param("hostname=web-1") == ("hostname", "web-1")
    assert parse_param('ssh_keys=["ssh-ed25519 AAAA x"]') == ("ssh_keys", ["ssh-ed25519 AAAA x"])
    assert parse_param("hostname=null") == ("hostname", None)
    assert parse_param("note=a=b") == ("note", "a=b")
    with pytest.raises(UsageError):
        parse_param("novalue")


NOW = 1_767_225_600.0        # 2026-01-01T00:00:00Z


@pytest.mark.parametrize("text, when", [
    ("30m", NOW - 1800), ("12h", NOW - 43200), ("7d", NOW - 7 * 86400), ("1w", NOW - 604800),
    ("1767000000", 1767000000.0), ("2026-01-31", calendar.timegm((2026, 1, 31, 0, 0, 0))),
    ("2026-01-31T12:00:00Z", calendar.timegm((2026, 1, 31, 12, 0, 0))),
    ("2026-01-31T12:00:00+01:00", calendar.timegm((2026, 1, 31, 11, 0, 0))),
])
def test_parse_when(text: str, when: float) -> None:
    assert parse_when(text, NOW) == when


def test_parse_when_refuses_nonsense() -> None:
    with pytest.raises(UsageError, match="a duration ago"):
        parse_when("yesterday", NOW)


def test_completion_script_names_every_noun_and_action() -> None:
    script = cli_client.render_bash_completion()
    assert "complete -F _lpmos lpmos" in script
    for noun, actions in cli_client.ACTIONS.items():
        assert f"        {noun}) echo {' '.join(actions)} ;;" in script
    assert '"task approve") echo' in script and "--revision" in script
