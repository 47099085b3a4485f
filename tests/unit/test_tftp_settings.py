"""The TFTP settings record: its defaults are the SETTINGS table's."""

from __future__ import annotations

from bootsvc.tftp.settings import DEFAULTS, SETTINGS, TftpSettings
from bootsvc.tftp.standalone import parse_args, settings_from_args
from bootsvc.wire.tftp import Limits
from lpmos.config import COMMON, resolve, settings_by_key


def test_defaults_are_the_tables():
    s = TftpSettings()
    table = {setting.key: setting.parse(setting.default) for setting in SETTINGS}
    assert table == DEFAULTS
    assert (s.port, s.max_blksize, s.max_windowsize, s.max_sessions,
            s.max_sessions_per_client, s.timeout, s.retries) == (
        table["tftp.port"], table["tftp.max_blksize"], table["tftp.max_windowsize"],
        table["tftp.max_sessions"], table["tftp.max_sessions_per_client"],
        table["tftp.timeout"], table["tftp.retries"])
    assert s.cache_bytes == table["tftp.cache_mb"] * 1024 * 1024
    assert s.spin == table["tftp.spin_us"] / 1e6
    assert s.limits == Limits()


def test_from_config_converts_units():
    config = resolve(settings_by_key([COMMON, SETTINGS]), flags={
        "tftp__port": "0", "tftp__cache_mb": "2", "tftp__spin_us": "20",
        "tftp__timeout": "0.5", "tftp__max_windowsize": "16"}, environ={}, config_file=None)
    s = TftpSettings.from_config(config)
    assert (s.port, s.cache_bytes, s.spin, s.timeout) == (0, 2 * 1024 * 1024, 20e-6, 0.5)
    assert s.limits == Limits(max_blksize=DEFAULTS["tftp.max_blksize"], max_windowsize=16,
                              default_timeout=0.5)


def test_from_values_keeps_defaults_for_missing_keys():
    assert TftpSettings.from_values({}) == TftpSettings()
    assert TftpSettings.from_values({"tftp.retries": 9}) == TftpSettings(retries=9)


def test_standalone_defaults_are_the_tables_but_its_address():
    args = parse_args(["/srv/tftp"])
    assert (args.host, args.port) == ("127.0.0.1", 6969)
    assert settings_from_args(args) == TftpSettings(port=6969)
    args = parse_args(["/srv/tftp", "--spin", "0", "--max-sessions", "2000"])
    assert settings_from_args(args) == TftpSettings(port=6969, spin=0.0, max_sessions=2000)
