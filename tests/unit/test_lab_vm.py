"""The pure parts of the lab's serial watcher as tables: which boot stages a
console line shows, and the console text without terminal noise."""

from __future__ import annotations

import re

import pytest

from lab.vm import SERIAL_STAGES, match_stages, strip_console

PATTERNS = [(name, re.compile(rx)) for name, rx in SERIAL_STAGES]
INDEX = {name: i for i, (name, _rx) in enumerate(SERIAL_STAGES)}


@pytest.mark.parametrize(("line", "start", "stages", "next_stage"), [
    ("SeaBIOS (version 1.16.2-debian-1.16.2-1)", "firmware", ["firmware"], "pxe"),
    # a stage the console never prints is skipped when a later one shows
    ("iPXE initialising devices...ok", "firmware", ["ipxe"], "boot-script"),
    # one line may show two stages in order
    ("BdsDxe: loading Boot0001 >>Start PXE over IPv4.", "firmware", ["firmware", "pxe"],
     "ipxe"),
    # a stage before the current one is not seen again (the second PXE boot)
    ("SeaBIOS (version 1.16.2)", "kernel", [], "kernel"),
    ("nothing of interest", "firmware", [], "firmware"),
    ("LPMOS dc1/SN1: install ubuntu 22.04", "decision", ["decision"], "kernel"),
    ("lab-os: callback succeeded", "disk-boot", ["callback"], None),
])
def test_match_stages_table(line: str, start: str, stages: list[str],
                            next_stage: str | None) -> None:
    got, index = match_stages(line, PATTERNS, INDEX[start])
    assert got == stages
    assert index == (INDEX[next_stage] if next_stage is not None else len(PATTERNS))


@pytest.mark.parametrize(("raw", "clean"), [
    ("\x1b[2J\x1b[01;01HSeaBIOS\r", "SeaBIOS"),
    ("\x1bciPXE\x1b[?25l ok\r", "iPXE ok"),
    ("plain", "plain"),
])
def test_strip_console_table(raw: str, clean: str) -> None:
    assert strip_console(raw) == clean
