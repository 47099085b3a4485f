from __future__ import annotations

from pathlib import Path

import pytest

from lpmos.cli import main
from lpmos.config import COMMON, ConfigError, resolve


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lpmos.toml"
    path.write_text(text)
    return path


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path, 'state_dir = "/from/file"\nlog_level = "debug"\n'
                                '[etcd]\ntimeout = 7\nprefix = "/fileprefix"\n')
    env = {"LPMOS_ETCD_TIMEOUT": "3", "LPMOS_STATE_DIR": "/from/env"}
    flags = {"state_dir": "/from/flag"}
    cfg = resolve(COMMON, flags, env, cfg_file)
    assert cfg["state_dir"] == Path("/from/flag") and cfg.sources["state_dir"].startswith("flag")
    assert cfg["etcd.timeout"] == 3.0 and cfg.sources["etcd.timeout"] == "env LPMOS_ETCD_TIMEOUT"
    assert cfg["log_level"] == "debug" and cfg.sources["log_level"].startswith("file")
    assert cfg["etcd.prefix"] == "/fileprefix"
    assert cfg["etcd.endpoints"] == [] and cfg.sources["etcd.endpoints"] == "default"


def test_bad_value_is_one_line_naming_setting_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(COMMON, {}, {"LPMOS_ETCD_TIMEOUT": "soon"}, None)
    message = str(err.value)
    assert "\n" not in message
    assert "etcd.timeout" in message and "LPMOS_ETCD_TIMEOUT" in message
    assert "a number from 0.1 to 60" in message


def test_endpoints_parsed_and_checked() -> None:
    cfg = resolve(COMMON, {"etcd__endpoints": "127.0.0.1:2379, https://e2:2379"}, {}, None)
    assert cfg["etcd.endpoints"] == ["http://127.0.0.1:2379", "https://e2:2379"]
    with pytest.raises(ConfigError):
        resolve(COMMON, {"etcd__endpoints": "ftp://x:1"}, {}, None)


def test_missing_or_broken_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(COMMON, {}, {}, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(COMMON, {}, {}, _write(tmp_path, "state_dir = ["))


def test_cli_wrong_value_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["config", "show", "--etcd-timeout", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "etcd.timeout" in err


def test_cli_config_show_lists_sources(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LPMOS_ETCD_PREFIX", "/envprefix")
    code = main(["config", "show", "--state-dir", str(tmp_path), "--config",
                 str(_write(tmp_path, 'log_level = "warning"\n'))])
    out = capsys.readouterr().out
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line and line[0] != "#"}
    assert "(flag --state-dir)" in lines["state_dir"]
    assert "(env LPMOS_ETCD_PREFIX)" in lines["etcd.prefix"]
    assert "(file " in lines["log_level"]
    assert "(default)" in lines["etcd.timeout"]


def test_cli_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("control-plane", "regional", "agent", "demo", "config", "token"):
        assert name in out


def test_config_file_keys_no_command_reads_are_named_on_stderr(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A typo in the shared config file is reported (with the closest key),
    a retired key says what became of it, and a key another command reads
    (web's, read by ``lpmos regional``) is not reported."""
    cfg_file = _write(tmp_path, 'log_level = "debug"\n'
                                '[tftp]\nspinn_us = 20\nlockstep_threads = 4\n'
                                '[etcd]\ntimeuot = 3\n'
                                '[web]\nlisten = "127.0.0.1:8080"\n'
                                '[nonsense]\nx = 1\n')
    assert main(["config", "show", "--config", str(cfg_file)]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert all(line.startswith(f"lpmos config: warning: config file {cfg_file}: ")
               for line in lines), err
    assert any("tftp.spinn_us: no such setting, ignored; did you mean tftp.spin_us?" in line
               for line in lines), err
    assert any("etcd.timeuot: no such setting, ignored; did you mean etcd.timeout?" in line
               for line in lines), err
    assert any("tftp.lockstep_threads: removed;" in line for line in lines), err
    assert any(line.endswith("nonsense.x: no such setting, ignored") for line in lines), err
    assert len(lines) == 4, err       # not log_level, not web.listen
    assert "debug" in out             # and the rest of the file still applies


def test_config_file_with_only_known_keys_warns_nothing(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg_file = _write(tmp_path, '[tftp]\nspin_us = 20\n[etcd]\ntimeout = 3\n')
    assert main(["config", "show", "--config", str(cfg_file)]) == 0
    assert capsys.readouterr().err == ""


def test_readme_config_example_uses_only_real_keys() -> None:
    """The README's example config files name settings that exist."""
    import re
    import tomllib

    from lpmos.cli import all_settings
    from lpmos.config import leaf_keys, unknown_keys

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert blocks
    settings, missing = all_settings()
    assert not missing
    for block in blocks:
        assert unknown_keys(leaf_keys(tomllib.loads(block)), (s.key for s in settings)) == []


def test_defaults_have_the_type_of_parsed_values() -> None:
    """A default is parsed like a flag, env or file value: ``lpmos demo``
    and ``lpmos control-plane`` unpack ``HOST, PORT`` from their listen
    setting, which once crashed when it came from the default string."""
    from lpmos.cli import all_settings

    settings, missing = all_settings()
    assert not missing
    cfg = resolve(settings, {}, {}, None)
    for setting in settings:
        assert cfg.sources[setting.key] == "default"
        assert cfg[setting.key] == setting.parse(setting.default), setting.key
    assert cfg["demo.listen"] == ("127.0.0.1", 8080)
    assert cfg["web.listen"] == ("127.0.0.1", 8080)
    assert cfg["state_dir"] == Path("/var/lib/lpmos")
    # and ``lpmos config show`` prints an address as it is written
    assert ("web.listen", "127.0.0.1:8080", "default") in cfg.describe()


def test_a_float_for_an_integer_setting_is_refused_not_cut(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path, '[web]\nthreads = 9.7\n')
    from lpmos.cli import all_settings

    with pytest.raises(ConfigError, match=r"web\.threads: 9\.7 from file .* expected an integer"):
        resolve(all_settings()[0], {}, {}, cfg_file)


def test_config_file_errors_name_the_file_once(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err == f"lpmos config: config file {tmp_path / 'nope.toml'} does not exist\n"
