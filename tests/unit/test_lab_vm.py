"""The pure parts of the lab's serial watcher as tables: which boot stages a
console line shows, and the console text without terminal noise."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

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


def test_wait_until_returns_the_first_truthy_value_or_names_the_wait(tmp_path: Path) -> None:
    from lab.process import LabError
    from lab.vm import VM

    vm = VM("v1", "bios", "52:54:00:00:00:01", "SN-1", "u", tmp_path)
    answers = iter([None, 0, {"ok": 1}])
    assert vm.wait_until("the answer", 5, lambda: next(answers), interval=0.01) == {"ok": 1}
    with pytest.raises(LabError, match="v1: the thing did not happen within 0 s"):
        vm.wait_until("the thing", 0.05, lambda: None, interval=0.01)
    vm.proc = subprocess.Popen(["true"])
    vm.proc.wait()
    with pytest.raises(LabError, match="QEMU exited before the login"):
        vm.wait_until("the login", 5, lambda: None, interval=0.01)
