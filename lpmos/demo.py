"""``lpmos demo`` — placeholder until the lab lands (issue 8)."""

from __future__ import annotations

import argparse
import sys

from lpmos.config import Config, Setting

HELP = "run everything on this machine with a QEMU lab"
SETTINGS: tuple[Setting, ...] = ()


def run(config: Config, args: argparse.Namespace) -> int:
    sys.stderr.write("lpmos demo: the QEMU lab is not built yet (issue 8)\n")
    return 1
