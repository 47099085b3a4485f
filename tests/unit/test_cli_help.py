"""Every subcommand has --help that explains every flag."""

from __future__ import annotations

import argparse

import pytest

from lpmos.cli import COMMANDS, build_parser


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_of_every_subcommand_has_help(name: str) -> None:
    parser, module = build_parser(name)
    assert module is not None
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[name]
    assert command.description, f"lpmos {name} has no description"
    missing = [a.option_strings or a.dest for a in command._actions
               if not (a.help and a.help.strip() and a.help != argparse.SUPPRESS)]
    assert missing == [], f"lpmos {name}: flags without help: {missing}"
    assert len(command.format_help()) > 200


def test_switches_and_choices_show_their_values() -> None:
    """``--discovery [on|off] ... (default: on ...)``, not ``(default: True)``;
    a choice lists its values instead of the key's name."""
    parser, _ = build_parser("regional")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.option_strings[0]: a for a in sub.choices["regional"]._actions
               if a.option_strings}
    assert actions["--discovery"].metavar == "on|off"
    assert "(default: on;" in actions["--discovery"].help  # type: ignore[operator]
    assert actions["--dhcp-mode"].metavar == "proxy|full|off"
    assert actions["--log-level"].metavar == "debug|info|warning|error"
