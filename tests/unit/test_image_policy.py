"""bootsvc.policy.images: which managed images a node fetches, keeps and
evicts, the reasons a task waits, and the boot decision row for them."""

from __future__ import annotations

import pytest

from bootsvc.policy.images import (
    Failure,
    LocalCopy,
    ProgressThrottle,
    cache_full_reason,
    decide_sync,
    image_of,
    needed_images,
    next_failure,
    wait_reason,
)
from bootsvc.policy.machine import MachineView
from bootsvc.policy.reaping import why_unservable
from bootsvc.policy.script import WAIT, decide_script
from lpmos.images import ImageFile, ManagedImage, NodeImageState
from lpmos.models import Task

MiB = 1 << 20


def rec(name: str, *, size: int = 10 * MiB, idcs: tuple[str, ...] = (), sha: str = "",
        state: str = "available", created: float = 0.0, os_type: str = "") -> ManagedImage:
    sha = sha or (name.encode().hex() * 64)[:64]
    return ManagedImage(name=name, os_type=os_type or f"OS {name}", os_family="debian",
                        format="raw",
                        files={"disk_image": ImageFile(f"http://src/{name}", sha, size)},
                        source="url", state=state, idcs=idcs, created_at=created)


def ready(r: ManagedImage, *, used: float = 0.0) -> LocalCopy:
    return LocalCopy(r.name, {"disk_image": r.sha256}, r.size, used)


def plan(records: list[ManagedImage], local: list[LocalCopy], *, capacity: int = 100 * MiB,
         needed: set[str] | None = None, failures: dict[str, Failure] | None = None,
         idc: str = "dc1", now: float = 1000.0):
    recs = {r.name: r for r in records}
    return decide_sync(recs, {c.name: c for c in local}, idc=idc, capacity=capacity,
                       needed=needed or set(), failures=failures or {},
                       revisions={r.name: 5 for r in records}, now=now)


def test_wanted_images_are_fetched_and_others_not() -> None:
    a, b, c = rec("a"), rec("b", idcs=("dc2",)), rec("c", state="uploading")
    p = plan([a, b, c], [])
    assert p.fetch == ("a",) and not p.evict and not p.remove and not p.full


def test_a_ready_copy_is_not_fetched_again() -> None:
    a = rec("a")
    assert plan([a], [ready(a)]).fetch == ()


def test_needed_images_first_then_oldest() -> None:
    a, b, c = rec("a", created=3), rec("b", created=1), rec("c", created=2)
    assert plan([a, b, c], [], needed={"a"}).fetch == ("a", "b", "c")


def test_removed_record_frees_the_copy() -> None:
    a = rec("a")
    p = plan([], [ready(a)])
    assert p.remove == ("a",) and p.fetch == ()


def test_replaced_record_removes_the_old_bytes_and_fetches_the_new() -> None:
    old = rec("a", sha="1" * 64)
    new = rec("a", sha="2" * 64)
    p = plan([new], [ready(old)])
    assert p.remove == ("a",) and p.fetch == ("a",)


def test_a_partial_copy_of_an_image_no_longer_wanted_is_removed() -> None:
    a = rec("a", idcs=("dc2",))
    p = plan([a], [LocalCopy("a", {}, 3 * MiB)])
    assert p.remove == ("a",)


def test_unwanted_ready_copies_are_evicted_lru_first_to_make_room() -> None:
    old1, old2 = rec("old1", idcs=("dc9",), size=40 * MiB), rec("old2", idcs=("dc9",),
                                                                 size=40 * MiB)
    new = rec("new", size=30 * MiB)
    p = plan([old1, old2, new], [ready(old1, used=20), ready(old2, used=10)], capacity=100 * MiB)
    assert p.fetch == ("new",) and p.evict == ("old2",)        # least recently used


def test_an_image_no_task_needs_never_evicts_a_wanted_one() -> None:
    spare, new = rec("spare", size=60 * MiB), rec("new", size=60 * MiB)
    p = plan([spare, new], [ready(spare)], capacity=100 * MiB)
    assert p.fetch == () and p.evict == ()
    assert p.full == {"new": "cache full: needs 60.0 MiB, 40.0 MiB free"}


def test_an_image_a_task_needs_evicts_a_wanted_spare() -> None:
    spare, new = rec("spare", size=60 * MiB), rec("new", size=60 * MiB)
    p = plan([spare, new], [ready(spare)], capacity=100 * MiB, needed={"new"})
    assert p.fetch == ("new",) and p.evict == ("spare",)


def test_an_image_an_active_task_needs_is_never_evicted() -> None:
    held, new = rec("held", size=60 * MiB), rec("new", size=60 * MiB)
    p = plan([held, new], [ready(held)], capacity=100 * MiB, needed={"held", "new"})
    assert p.evict == () and p.fetch == ()
    assert p.full["new"].startswith("cache full: needs 60.0 MiB, 40.0 MiB free")


def test_bytes_already_downloaded_count_toward_the_need() -> None:
    a = rec("a", size=60 * MiB)
    p = plan([a], [LocalCopy("a", {}, 50 * MiB)], capacity=70 * MiB)
    assert p.fetch == ("a",)


def test_two_fetches_reserve_their_space() -> None:
    a, b = rec("a", size=60 * MiB, created=1), rec("b", size=60 * MiB, created=2)
    p = plan([a, b], [], capacity=100 * MiB)
    assert p.fetch == ("a",) and "b" in p.full


def test_failed_image_waits_for_its_retry_time_or_a_new_revision() -> None:
    a = rec("a")
    fail = Failure(revision=5, at=1000.0, count=1, reason="HTTP 503")
    assert plan([a], [], failures={"a": fail}, now=1030.0).fetch == ()
    assert plan([a], [], failures={"a": fail}, now=1061.0).fetch == ("a",)
    other = Failure(revision=4, at=1000.0, count=1)
    assert plan([a], [], failures={"a": other}, now=1001.0).fetch == ("a",)
    final = Failure(revision=5, at=0.0, count=1, retry=False)
    assert plan([a], [], failures={"a": final}, now=1e9).fetch == ()


def test_retry_back_off_doubles_up_to_an_hour() -> None:
    f = None
    delays = []
    for _ in range(9):
        f = next_failure(f, revision=1, now=0.0, reason="x", retry=True)
        delays.append(f.retry_at())
    assert delays[:4] == [60.0, 120.0, 240.0, 480.0] and delays[-1] == 3600.0
    assert next_failure(f, revision=2, now=0.0, reason="x", retry=True).count == 1


def task(status: str, *, image: str = "", os_type: str = "OS a", version: str = "") -> Task:
    return Task(idc="dc1", sn="SN1", mac="52:54:00:00:00:01", os_type=os_type,
                os_version=version, image=image, status=status).validate()


def test_which_image_a_task_needs_by_name_or_os_type() -> None:
    a, b = rec("a"), rec("b", os_type="Debian 12")
    recs = {"a": a, "b": b}
    assert image_of(recs, recs, task("approved", image="a")) == "a"
    assert image_of(recs, recs, task("approved", image="zz")) == ""
    assert image_of(recs, recs, task("approved", os_type="debian 12")) == "b"
    tasks = [task("approved", image="a"), task("succeeded", image="b"),
             task("installing", os_type="Debian 12")]
    assert needed_images(tasks, recs) == {"a", "b"}
    assert needed_images([task("pending", image="a")], recs) == set()


@pytest.mark.parametrize(("record", "state", "idc", "words"), [
    (None, None, "dc1", ""),
    (rec("g", state="uploading"), None, "dc1",
     "image g is still being uploaded to the control plane"),
    (rec("g", idcs=("dc2",)), None, "dc1", "image g is not offered in IDC dc1 (it is for dc2)"),
    (rec("g"), None, "dc1", "image g is queued for fetching on node n1"),
    (rec("g"), NodeImageState("g", "", "fetching", 42, 100), "dc1",
     "image g fetching on node n1, 42 %"),
    (rec("g"), NodeImageState("g", "", "failed", 0, 100, reason="HTTP 404 Not Found"), "dc1",
     "image g failed on node n1: HTTP 404 Not Found"),
    (rec("g"), NodeImageState("g", "", "ready", 100, 100), "dc1", ""),
])
def test_wait_reasons(record, state, idc, words) -> None:
    assert wait_reason(record, state, idc=idc, node="n1") == words


def test_boot_decision_waits_with_the_image_reason_and_never_claims() -> None:
    v = MachineView("SN1", task("approved", image="g"), 3, None)
    d = decide_script(v, discovery=True, image=None, live_available=True,
                      now=0.0, image_wait="image g fetching on node n1, 42 %")
    assert d.action == WAIT and d.reason == "image g fetching on node n1, 42 %"
    assert not d.destructive
    # without a managed image the old row stands
    d = decide_script(v, discovery=True, image=None, live_available=True, now=0.0)
    assert d.action == WAIT and "not in the catalog" in d.reason
    # pending tasks still discover: the image does not matter yet
    d = decide_script(MachineView("SN1", task("pending", image="g"), 3, None), discovery=True,
                      image=None, live_available=True, now=0.0, image_wait="image g fetching")
    assert d.action == "discovery"
    assert why_unservable(v, node="n1", image=None, live_available=True, now=0.0,
                          image_wait="image g failed on node n1: x") == \
        "node n1 would not install it: image g failed on node n1: x"


def test_cache_full_reason_names_both_sizes() -> None:
    assert cache_full_reason(3 * (1 << 30), 512 * 1024) == \
        "cache full: needs 3.0 GiB, 512.0 KiB free"
    assert cache_full_reason(10, -5) == "cache full: needs 10 B, 0 B free"


def test_progress_is_throttled_to_a_second_or_five_percent() -> None:
    t = ProgressThrottle()
    assert t.due(0, 100, 0.0)
    assert not t.due(1, 100, 0.1)          # too soon, too little
    assert not t.due(6, 100, 0.2)          # 5 % but under a quarter second
    assert t.due(6, 100, 0.3)              # 5 % after a quarter second
    assert not t.due(7, 100, 0.5)
    assert t.due(7, 100, 1.31)             # a second
    assert t.due(7, 0, 2.4) and not t.due(8, 0, 2.5)    # unknown total: per second only
