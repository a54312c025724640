"""The top-level ``groups:`` and ``leapfile:`` keys of modules.yaml, and the ntp_group block."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ntp_probe.cli.main import main
from ntp_probe.config import load
from ntp_probe.config.load import config_to_yaml, parse_config
from ntp_probe.config.schema import ConfigError
from tests.unit.test_leapfile import REAL_ENTRIES, build

MODULES = "modules:\n  g: {prober: ntp_group, ntp_group: {max_falsetickers: 2}}\n"


def test_groups_are_kept_as_canonical_targets() -> None:
    config = parse_config("groups:\n  eu: [NTP1.Example.net, '[::ffff:192.0.2.1]:123', "
                          "'[2001:db8::1]:1123']\n" + MODULES, "t")
    assert config.groups == {"eu": ("ntp1.example.net", "192.0.2.1:123", "[2001:db8::1]:1123")}
    assert config.modules["g"].ntp_group.max_falsetickers == 2
    again = parse_config(config_to_yaml(config), "again")
    assert again.groups == config.groups and again.modules == config.modules


@pytest.mark.parametrize(("groups", "message"), [
    ("[a, b]", "t:1:1: groups: expected a mapping of group names"),
    ("{eu: []}", "t:1:10: groups.eu: expected a non-empty list"),
    ("{eu: a.example}", "t:1:10: groups.eu: expected a non-empty list"),
    ("{'e,u': [a.example]}", "groups.e,u: a group name is 1 to 64 letters"),
    ("{eu: [a.example, 'http://b']}", r"groups.eu\[1\]: invalid target 'http://b'"),
    ("{eu: [a.example, A.example]}", r"groups.eu\[1\]: a.example is listed twice"),
    # Sent out of whichever interface's route came first, it would fail the whole group.
    ("{eu: [a.example, '[fe80::1]:123']}",
     r"groups.eu\[1\]: member '\[fe80::1\]:123': a link-local address needs its interface"),
    ("{eu: [a.example, 5]}", r"groups.eu\[1\]: expected host or host:port, got 5"),
    ("{eu: ['a.example,b.example']}", r"groups.eu\[0\]: .* one member per item"),
    # Groups do not nest: a group's name as a member is no host name to look up.
    ("{eu: [a.example], all: [EU, b.example]}", r"groups.all\[0\]: 'EU' is a group"),
    ("{eu: [a.example], all: [b.example, 'eu:123']}", r"groups.all\[1\]: 'eu:123' is a group"),
    ("{eu: [a.example], all: [b.example, eu.]}", r"groups.all\[1\]: 'eu.' is a group"),
    ("{eu: [a.example], EU: [b.example]}", r"groups.EU: the same name as group eu"),
])
def test_bad_groups_are_config_errors_with_positions(groups: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f"groups: {groups}\n" + MODULES, "t")


def test_a_group_has_at_most_16_members() -> None:
    members = [f"192.0.2.{i}" for i in range(1, 18)]
    with pytest.raises(ConfigError, match=r"groups\.big: 17 members: a group has at most 16"):
        parse_config(yaml.safe_dump({"groups": {"big": members}}) + MODULES, "t")
    parse_config(yaml.safe_dump({"groups": {"big": members[:16]}}) + MODULES, "t")


def test_max_falsetickers_is_bounded_and_only_for_ntp_group() -> None:
    with pytest.raises(ConfigError, match=r"max_falsetickers: expected an integer in 0..16"):
        parse_config("modules:\n  g: {prober: ntp_group, ntp_group: {max_falsetickers: 17}}\n",
                     "t")
    with pytest.raises(ConfigError, match=r"modules\.n\.ntp_group: only for modules "
                                          r"with prober: ntp_group"):
        parse_config("modules:\n  n: {prober: ntp, ntp_group: {max_falsetickers: 1}}\n", "t")


# --- leapfile ---------------------------------------------------------------------------

def test_a_leapfile_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "leap.list").write_text(build(REAL_ENTRIES))
    config = parse_config("leapfile: leap.list\n" + MODULES, str(tmp_path / "modules.yaml"))
    assert config.leapfile_path == str(tmp_path / "leap.list")
    assert config.leapfile is not None and config.leapfile.hash_valid
    assert config.leapfile.tai_offset(1.8e9) == 37


def test_a_leap_file_that_cannot_vouch_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "leap.list"
    path.write_text(build(REAL_ENTRIES))
    config = parse_config(f"leapfile: {path}\n" + MODULES, "t")
    before_expiry = config.leapfile.expires - 1 if config.leapfile else 0
    assert load.leapfile_warning(config, before_expiry) is None
    warning = load.leapfile_warning(config, before_expiry + 2)
    assert warning is not None and "it expired on 2027-06-28" in warning, warning
    path.write_text(build(REAL_ENTRIES, words=(1, 2, 3, 4, 5)))
    broken = parse_config(f"leapfile: {path}\n" + MODULES, "t")
    warning = load.leapfile_warning(broken, before_expiry)
    assert warning is not None and "hash is missing or does not match" in warning, warning
    assert load.leapfile_warning(parse_config('leapfile: ""\n' + MODULES, "t"), 0) is None


def test_config_check_passes_but_warns_of_a_leap_file_that_cannot_vouch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "leap.list").write_text(build(REAL_ENTRIES, words=(1, 2, 3, 4, 5)))
    modules = tmp_path / "modules.yaml"
    modules.write_text("leapfile: leap.list\n" + MODULES)
    assert main(["--config.check", f"--config.file={modules}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("configuration OK")
    assert "level=warn" in captured.err and "hash is missing or does not match" in captured.err


def test_a_broken_hash_loads_but_is_not_valid(tmp_path: Path) -> None:
    path = tmp_path / "leap.list"
    path.write_text(build(REAL_ENTRIES, words=(1, 2, 3, 4, 5)))
    config = parse_config(f"leapfile: {path}\n" + MODULES, "t")
    assert config.leapfile is not None and not config.leapfile.hash_valid


@pytest.mark.parametrize(("content", "message"), [
    (None, r"t:1:1: leapfile: .*/leap.list: cannot read: No such file"),
    ("#$ 1\n", r"t:1:1: leapfile: .*/leap.list: not a leap-seconds.list file: no '#@'"),
])
def test_a_named_leapfile_must_be_readable(tmp_path: Path, content: str | None,
                                           message: str) -> None:
    path = tmp_path / "leap.list"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse_config(f"leapfile: {path}\n" + MODULES, "t")


def test_the_default_leapfile_is_optional(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setattr(load, "DEFAULT_LEAPFILE", str(tmp_path / "missing.list"))
    config = parse_config(MODULES, "t")
    assert (config.leapfile_path, config.leapfile) == ("", None)
    (tmp_path / "missing.list").write_text(build(REAL_ENTRIES))
    config = parse_config(MODULES, "t")
    assert config.leapfile_path == str(tmp_path / "missing.list")
    assert config.leapfile is not None


def test_an_empty_leapfile_turns_the_check_off() -> None:
    config = parse_config("leapfile: ''\n" + MODULES, "t")
    assert (config.leapfile_path, config.leapfile) == ("", None)
    assert "leapfile: ''" in config_to_yaml(config)
    with pytest.raises(ConfigError, match="t:1:1: leapfile: expected a file path"):
        parse_config("leapfile: [a]\n" + MODULES, "t")
