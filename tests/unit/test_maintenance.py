"""etcd maintenance, the parts that need no etcd: when to defragment, the
embedded etcd's flags, the reasons /healthz gives, labelled gauges."""

from __future__ import annotations

import math

import pytest

from lpmos.metrics import Registry
from lpmos.store import StoreUnavailable
from lpmos.store.embedded import EtcdOptions
from lpmos.store.etcd import Alarm, MemberStatus
from lpmos.store.maintenance import DefragPolicy, EtcdMaintenance, decide_defragment
from tests.prometheus_text import has_sample, value

MiB = 2**20


def status(db_size: int, in_use: int) -> MemberStatus:
    return MemberStatus("http://e:2379", 0x2A, 0x2A, "3.4.23", 9, 9, db_size, in_use)


@pytest.mark.parametrize(("db", "in_use", "nospace", "since", "expected"), [
    (1024 * MiB, 100 * MiB, False, math.inf, True),     # 90 % free: pays
    (1024 * MiB, 600 * MiB, False, math.inf, False),    # 41 % free: not enough
    (100 * MiB, 40 * MiB, False, math.inf, False),      # 60 % but 60 MiB < 64 MiB
    (200 * MiB, 0, False, math.inf, False),             # size in use unknown: never guess
    (1024 * MiB, 1024 * MiB, True, math.inf, True),     # NOSPACE: in use is stale, try
    (1024 * MiB, 1024 * MiB, True, 30.0, False),        # ... but not again within a minute
    (1024 * MiB, 1024 * MiB, True, 61.0, True),
])
def test_decide_defragment(db: int, in_use: int, nospace: bool, since: float,
                           expected: bool) -> None:
    assert decide_defragment(status(db, in_use), DefragPolicy(), nospace=nospace,
                             since_last=since) is expected


def test_embedded_etcd_options_become_flags_and_bad_ones_are_refused() -> None:
    assert EtcdOptions().args() == ["--auto-compaction-mode", "periodic",
                                    "--auto-compaction-retention", "5m",
                                    "--quota-backend-bytes", "0"]
    assert EtcdOptions("revision", "10000", 1 << 30).args()[-3:] == \
        ["10000", "--quota-backend-bytes", str(1 << 30)]
    assert EtcdOptions("periodic", "1h30m").auto_compaction_retention == "1h30m"
    for mode, retention in (("periodic", "5 minutes"), ("revision", "5m"), ("revision", "0"),
                            ("hourly", "1")):
        with pytest.raises(ValueError):
            EtcdOptions(mode, retention)


class Fixed:
    """A cluster member with NOSPACE raised (matchbox-style fixed fake)."""

    def __init__(self) -> None:
        self.broken = False

    def status(self) -> MemberStatus:
        if self.broken:
            raise StoreUnavailable("etcd status: no answer within 2s")
        return status(3 * MiB, MiB)

    def alarms(self) -> list[Alarm]:
        return [Alarm(0x2A, "NOSPACE")]

    def defragment(self, timeout: float = 60.0) -> None:
        raise AssertionError("a cluster's member is never defragmented by LPMOS")

    def disarm(self, alarm: Alarm) -> None:
        raise AssertionError("nor its alarm disarmed")


def test_reasons_and_metrics_name_the_alarm_and_survive_a_failed_check() -> None:
    fake = Fixed()
    metrics = Registry()
    m = EtcdMaintenance(fake, metrics)
    assert m.reasons() == []
    assert value(metrics.render(), "lpmos_etcd_alarm", alarm="nospace") == 0
    assert not has_sample(metrics.render(), "lpmos_etcd_db_size_bytes")  # not checked yet
    m.check()
    assert m.reasons() == ["etcd alarm NOSPACE on member 2a (database 3.0 MiB): the backend "
                           "quota is full and etcd refuses every write (no installs, progress "
                           "spooled); compact, defragment, then disarm the alarm"]
    text = metrics.render()
    assert value(text, "lpmos_etcd_alarm", alarm="nospace") == 1
    assert has_sample(text, "lpmos_etcd_alarm", alarm="corrupt")
    assert value(text, "lpmos_etcd_alarm", alarm="corrupt") == 0
    assert text.count("# TYPE lpmos_etcd_alarm gauge") == 1
    assert value(text, "lpmos_etcd_db_size_bytes") == 3 * MiB
    # etcd stops answering: the alarm is not taken as cleared
    fake.broken = True
    health = m.check()
    assert "no answer" in health.error and m.alarm_raised("NOSPACE")
    assert m.counts.errors == {"StoreUnavailable": 1}
