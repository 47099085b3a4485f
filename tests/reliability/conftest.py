"""Fixtures of the reliability suite (helpers in :mod:`tests.reliability.support`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.support import ControlPlane, Regional


@pytest.fixture
def regional_factory(tmp_path: Path) -> Iterator[Callable[..., Regional]]:
    """``make(etcd_url, prefix, name=..., flags=[...])`` → an unstarted Regional;
    every one made is killed at teardown."""
    made: list[Regional] = []

    def make(etcd_url: str, prefix: str, *, name: str = "node-r",
             flags: list[str] | None = None) -> Regional:
        node = Regional(etcd_url, prefix, tmp_path, name, list(flags or []))
        made.append(node)
        return node

    yield make
    for node in made:
        node.kill()


@pytest.fixture
def control_plane_factory(tmp_path: Path) -> Iterator[Callable[..., ControlPlane]]:
    made: list[ControlPlane] = []

    def make(etcd_url: str, prefix: str, *, name: str = "cp",
             flags: list[str] | None = None) -> ControlPlane:
        cp = ControlPlane(etcd_url, prefix, tmp_path, name, list(flags or []))
        made.append(cp)
        return cp

    yield make
    for cp in made:
        cp.kill()
