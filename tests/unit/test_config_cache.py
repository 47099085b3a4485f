"""The install-config render cache: which requests the inline path may
answer (the token as the route reads it), the bounds of the cache, and
when an entry is current (issue #23 item 4)."""

from __future__ import annotations

import gc
import hashlib
import weakref
from typing import Any

import pytest

from bootsvc.http.config_cache import (
    ConfigCache,
    ConfigEntry,
    ConfigRequest,
    parse_config_request,
)


class Rec:
    """A record (task, server, image ...): any object a weak reference can name."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


KEPT = [Rec(kind=k) for k in ("task", "image", "live", "renderer")]
TOKEN = "Zm9vYmFyYmF6cXV4LXRva2VuX2Zvcl90ZXN0c19vbmx5XzEy"


@pytest.mark.parametrize(("path", "query", "authorization", "expected"), [
    (f"/config/SN1/t/{TOKEN}/ks.cfg", "", None, ConfigRequest("SN1", "ks.cfg", TOKEN)),
    # the path's token wins; header and query are ignored, as the route does
    (f"/config/SN1/t/{TOKEN}/user-data", "token=other", "Bearer other",
     ConfigRequest("SN1", "user-data", TOKEN)),
    ("/config/SN1/ks.cfg", "", f"Bearer {TOKEN}", ConfigRequest("SN1", "ks.cfg", TOKEN)),
    ("/config/SN1/ks.cfg", "", f"bearer  {TOKEN} ", ConfigRequest("SN1", "ks.cfg", TOKEN)),
    ("/config/SN1/ks.cfg", f"token={TOKEN}", None, ConfigRequest("SN1", "ks.cfg", TOKEN)),
    # a header that is not Bearer: the query's token, as request_token() reads it
    ("/config/SN1/ks.cfg", f"token={TOKEN}", "Basic abc", ConfigRequest("SN1", "ks.cfg", TOKEN)),
])
def test_parse_config_request_reads_the_token_as_the_route_does(
        path: str, query: str, authorization: str | None, expected: ConfigRequest) -> None:
    assert parse_config_request(path, query, authorization) == expected


@pytest.mark.parametrize(("path", "query", "authorization"), [
    ("/config/SN1/ks.cfg", "", None),                       # no token: the route's 401
    ("/config/SN1/ks.cfg", "", "Bearer "),                  # empty Bearer: 401, not the query
    ("/config/SN1/ks.cfg", f"token={TOKEN}", "Bearer "),
    ("/config/SN1/ks.cfg", f"token={TOKEN}&x=1", None),     # other fields: the route parses
    ("/config/SN1/ks.cfg", f"x=1&token={TOKEN}", None),
    ("/config/SN1/ks.cfg", "token=a%2Bb", None),
    ("/config/SN%31/ks.cfg", f"token={TOKEN}", None),       # escapes: the route decodes
    ("/config/SN1/x/t/ks.cfg", "", f"Bearer {TOKEN}"),      # neither route shape
    ("/config/SN1/ks.cfg/", "", f"Bearer {TOKEN}"),
    ("/config/SN1", "", f"Bearer {TOKEN}"),
    ("/config//ks.cfg", "", f"Bearer {TOKEN}"),
    ("/config/SN1/KS.CFG", "", f"Bearer {TOKEN}"),          # not a config name
    ("/config/SN1/ks.cfg", "", "Bearer " + "x" * 129),      # longer than any token
    ("/config/SN1/ks.cfg", "", f"Bearer {TOKEN},x"),        # two headers joined
    ("/config/SN 1/ks.cfg", "", f"Bearer {TOKEN}"),
    ("/configs/SN1/ks.cfg", "", f"Bearer {TOKEN}"),
    ("/boot/SN1/ks.cfg", "", f"Bearer {TOKEN}"),
])
def test_parse_config_request_leaves_anything_unusual_to_the_route(
        path: str, query: str, authorization: str | None) -> None:
    assert parse_config_request(path, query, authorization) is None


def entry(sn: str = "SN1", name: str = "ks.cfg", body: bytes = b"x" * 10, **kw: Any
          ) -> ConfigEntry:
    fields: dict[str, Any] = {
        "task_revision": 7, "task": KEPT[0], "server": None, "image": KEPT[1],
        "live": KEPT[2], "renderer": KEPT[3], "node_url": "http://10.0.0.1:8081",
        "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    fields.update(kw)
    return ConfigEntry(sn=sn, name=name, body=body, **fields)


def test_cache_keeps_one_entry_per_sn_and_name_and_counts_bytes() -> None:
    cache = ConfigCache()
    first = entry(body=b"a" * 100)
    assert cache.put(first) and cache.get("SN1", "ks.cfg") is first
    newer = entry(body=b"b" * 30)
    assert cache.put(newer)
    assert len(cache) == 1 and cache.bytes == 30 and cache.get("SN1", "ks.cfg") is newer
    assert cache.put(entry(name="user-data", body=b"c" * 5))
    assert len(cache) == 2 and cache.bytes == 35
    cache.discard("SN1", "ks.cfg")
    assert cache.get("SN1", "ks.cfg") is None and cache.bytes == 5
    cache.discard("SN1", "ks.cfg")                      # twice: nothing to do
    assert len(cache) == 1 and cache.bytes == 5


def test_cache_is_bounded_in_count_least_recently_used_out_first() -> None:
    cache = ConfigCache(max_entries=3)
    for i in range(3):
        cache.put(entry(sn=f"SN{i}"))
    assert cache.get("SN0", "ks.cfg") is not None       # SN0 used: SN1 is now the oldest
    cache.put(entry(sn="SN3"))
    assert len(cache) == 3 and cache.bytes == 30
    assert cache.get("SN1", "ks.cfg") is None
    assert all(cache.get(f"SN{i}", "ks.cfg") is not None for i in (0, 2, 3))


def test_cache_is_bounded_in_bytes() -> None:
    cache = ConfigCache(max_bytes=250, max_entry_bytes=100)
    for i in range(5):
        assert cache.put(entry(sn=f"SN{i}", body=b"z" * 100))
    assert cache.bytes <= 250 and len(cache) == 2
    assert [i for i in range(5) if cache.get(f"SN{i}", "ks.cfg")] == [3, 4]


def test_an_entry_over_the_per_entry_limit_is_not_kept_and_empties_its_slot() -> None:
    cache = ConfigCache(max_bytes=1000, max_entry_bytes=100)
    assert cache.put(entry(body=b"s" * 100))
    assert not cache.put(entry(body=b"L" * 101))
    assert cache.get("SN1", "ks.cfg") is None and cache.bytes == 0 and len(cache) == 0


def test_entry_is_current_only_for_the_very_inputs_it_was_rendered_from() -> None:
    e = entry()
    same: dict[str, Any] = {"task_revision": 7, "task": KEPT[0], "server": None, "image": KEPT[1],
            "live": KEPT[2], "renderer": KEPT[3], "node_url": e.node_url,
            "token_sha256": e.token_sha256}
    assert e.current(**same)
    changed: dict[str, Any] = {"task_revision": 8, "task": Rec(), "server": Rec(), "image": Rec(),
               "live": None, "renderer": Rec(), "node_url": "http://10.0.0.2:8081",
               "token_sha256": hashlib.sha256(b"another token").hexdigest()}
    for field, value in changed.items():
        assert not e.current(**{**same, field: value}), field


def test_equal_but_distinct_records_are_not_the_same_render() -> None:
    """Identity, not equality: the machine index makes a new task object
    for every stored revision, so an equal copy is never the current one."""
    task = Rec(sn="SN1", params={"hostname": "a"})
    e = entry(task=task)
    same: dict[str, Any] = {"task_revision": 7, "server": None, "image": KEPT[1], "live": KEPT[2],
            "renderer": KEPT[3], "node_url": e.node_url, "token_sha256": e.token_sha256}
    assert e.current(task=task, **same)
    assert not e.current(task=Rec(**task.__dict__), **same)


def test_an_entry_keeps_no_record_alive_and_a_freed_one_never_matches() -> None:
    """A stale entry holds its body only: the records it was rendered from
    are freed when the index drops them, and nothing (not a new object at
    the same address, not None) is then the same as them."""
    task, server = Rec(rev=7), Rec(macs=["52:54:00:00:00:01"])
    watch = weakref.ref(server)
    e = entry(task=task, server=server)
    same: dict[str, Any] = {"task_revision": 7, "image": KEPT[1], "live": KEPT[2],
                            "renderer": KEPT[3], "node_url": e.node_url,
                            "token_sha256": e.token_sha256}
    assert e.current(task=task, server=server, **same)
    del server
    gc.collect()
    assert watch() is None
    assert not e.current(task=task, server=None, **same)
    assert not any(e.current(task=task, server=Rec(), **same) for _ in range(100))
