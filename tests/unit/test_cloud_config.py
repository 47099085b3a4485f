"""Install inputs and the NoCloud seed rendered from them.

Every rendered cloud-config (the image seed's user-data in each network
shape, with and without the operator's cloud-config and a password hash,
and Ubuntu autoinstall's embedded user-data) passes Debian's real
``cloud-init schema -c``; every rendered network-config converts with
cloud-init's own ``cloud-init devel net-convert`` for ifupdown (what the
Debian image uses) and networkd.  The builders and checks are tables.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsvc.policy.script import CONFIG_TEMPLATES
from bootsvc.render import Renderer, RenderError
from lpmos.cloudconfig import (
    CloudConfigRejected,
    SchemaCheckUnavailable,
    check_cloud_config,
    merge_cloud_config,
    parse_cloud_config,
    parse_install_params,
    redact_params,
    schema_message,
)
from lpmos.models import (
    ValidationError,
    validate_hostname,
    validate_password_hash,
    validate_ssh_keys,
)
from lpmos.netconfig import build_network_config, parse_network
from tests.unit.test_render import NODE, TOKEN, ctx, make_task

needs_cloud_init = pytest.mark.skipif(shutil.which("cloud-init") is None,
                                      reason="Debian's cloud-init package is not installed")

ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJwBy81ESfbpiRL0iK6I1xhzQZ1kD4DNg8EiDG/W2sQH "
           "lab@lpmos")
ECDSA = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLwuKvNKR+lRy"
         "dyMVr9+Csf/UEAcTBm2Lp0D6kUCgox2v4vycm+eyJL+BTGB0QDbL2KBFAk3pDWEI7Ekr1YJkng= ops")
RSA = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCyJah/ZMrHU5lV+0U8xIA3dOrGgazjygLkN0JbgVf/xhhgwLa"
       "tz7VY5oX7pV0Q0uy/n2s74Gl0aNyi82gCP4Mzqub+056aNENTYhNAVXrA3D1gMUfxoHOf5PZPOFxtb8hxGDvzNb/"
       "i6nEoKgShsXNKGkU0cYuIJRtrueMo328tSRmbkHuewyCpWCUGvjnu/aAZJJwW9fbDWutFJjUtDOOfxV3XSeEYWIu"
       "m/A1rkDCp6v6GNSp269B+Tf7nU/FZNnX763uxNMYQQvYix4v5S/dd54U1ISHo1rQg0Qhl13qrgR6ZWQcnZ1xJlyk"
       "JclckBSSu/Kht2+eYP82Z96i3EleV r")
SHA512 = ("$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/"
          "cZ/1GM/O6IND4WQhG.")
SHA256 = "$5$abcdefgh$gruCpC7VkOTspMQTTSAR8mtlO9Upms.fwqE5y16JVM."
YESCRYPT = "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7"
BCRYPT = "$2b$12$" + "K" * 22 + "abcdefghijklmnopqrstuvwxyzABCDE"
MAC = "52:54:00:12:34:56"
MAC2 = "52:54:00:12:34:57"
MAC3 = "52:54:00:12:34:58"
OPERATOR = ("#cloud-config\npackages: [htop]\nruncmd:\n  - [touch, /root/operator-was-here]\n"
            "write_files:\n  - path: /etc/motd\n    content: hello\n"
            "reporting:\n  theirs: {type: log}\n")

# --- network shapes: what the operator writes, and the v2 it becomes -----------------------

DHCP_V2 = {"version": 2, "ethernets": {"eth0": {"match": {"macaddress": MAC}, "set-name": "eth0",
                                                "dhcp4": True}}}
STATIC_V4 = {"mode": "static", "addresses": ["192.0.2.10/24"], "gateway4": "192.0.2.1",
             "dns": {"servers": ["192.0.2.53"], "search": ["example.com"]}}
STATIC_V6 = {"mode": "static", "addresses": ["2001:db8::10/64"], "gateway6": "2001:db8::1",
             "dns": {"servers": ["2001:db8::53"]}}
DUAL = {"mode": "static", "addresses": ["192.0.2.10/24", "2001:db8::10/64"],
        "gateway4": "192.0.2.1", "gateway6": "fe80::1"}
BOND = {"mode": "static", "interface": "bond0", "addresses": ["198.51.100.7/25"],
        "gateway4": "198.51.100.1",
        "bonds": {"bond0": {"members": [MAC, MAC2], "mode": "802.3ad", "lacp_rate": "fast",
                            "hash_policy": "layer3+4"}}}
VLAN = {"mode": "static", "interface": "vlan100", "addresses": ["203.0.113.9/24"],
        "gateway4": "203.0.113.1",
        "bonds": {"bond0": {"members": [MAC2, MAC3], "mode": "active-backup"}},
        "vlans": {"vlan100": {"id": 100, "link": "bond0"}}}
VLAN_ON_BOOT_NIC = {"mode": "static", "interface": "mgmt", "addresses": ["10.9.0.5/16"],
                    "vlans": {"mgmt": {"id": 42, "link": "eth0"}}}

ETH0 = {"match": {"macaddress": MAC}, "set-name": "eth0"}
ETH1 = {"match": {"macaddress": MAC2}, "set-name": "eth1"}
ETH2 = {"match": {"macaddress": MAC3}, "set-name": "eth2"}

NETWORK_TABLE: list[tuple[str, Any, dict[str, Any]]] = [
    ("default", None, DHCP_V2),
    ("dhcp", {"mode": "dhcp"}, DHCP_V2),
    ("static-v4", STATIC_V4, {"version": 2, "ethernets": {"eth0": {
        **ETH0, "addresses": ["192.0.2.10/24"], "gateway4": "192.0.2.1",
        "nameservers": {"addresses": ["192.0.2.53"], "search": ["example.com"]}}}}),
    ("static-v6", STATIC_V6, {"version": 2, "ethernets": {"eth0": {
        **ETH0, "addresses": ["2001:db8::10/64"], "gateway6": "2001:db8::1",
        "nameservers": {"addresses": ["2001:db8::53"]}}}}),
    ("dual-stack", DUAL, {"version": 2, "ethernets": {"eth0": {
        **ETH0, "addresses": ["192.0.2.10/24", "2001:db8::10/64"], "gateway4": "192.0.2.1",
        "gateway6": "fe80::1"}}}),
    ("bond", BOND, {"version": 2, "ethernets": {"eth0": ETH0, "eth1": ETH1},
                    "bonds": {"bond0": {"interfaces": ["eth0", "eth1"], "parameters": {
                        "mode": "802.3ad", "mii-monitor-interval": 100, "lacp-rate": "fast",
                        "transmit-hash-policy": "layer3+4"},
                        "addresses": ["198.51.100.7/25"], "gateway4": "198.51.100.1"}}}),
    ("vlan-on-bond", VLAN, {"version": 2,
                            "ethernets": {"eth0": {**ETH0, "dhcp4": True}, "eth1": ETH1,
                                          "eth2": ETH2},
                            "bonds": {"bond0": {"interfaces": ["eth1", "eth2"], "parameters": {
                                "mode": "active-backup", "mii-monitor-interval": 100}}},
                            "vlans": {"vlan100": {"id": 100, "link": "bond0",
                                                  "addresses": ["203.0.113.9/24"],
                                                  "gateway4": "203.0.113.1"}}}),
    ("vlan-on-boot-nic", VLAN_ON_BOOT_NIC, {"version": 2, "ethernets": {"eth0": ETH0},
                                            "vlans": {"mgmt": {"id": 42, "link": "eth0",
                                                               "addresses": ["10.9.0.5/16"]}}}),
]


@pytest.mark.parametrize(("name", "network", "expected"), NETWORK_TABLE,
                         ids=[n for n, _, _ in NETWORK_TABLE])
def test_network_config_v2_is_built_as_the_table_says(name: str, network: Any,
                                                      expected: dict[str, Any]) -> None:
    built = build_network_config(parse_network(network, boot_mac=MAC), MAC)
    assert built == expected
    rendered = yaml.safe_load(Renderer().render(CONFIG_TEMPLATES["image"]["network-config"],
                                                ctx("image", make_task(network=network))))
    assert rendered == expected


def test_autoinstall_network_keeps_netplan_names() -> None:
    built = build_network_config(parse_network(BOND, boot_mac=MAC), MAC, rename=False)
    assert built["ethernets"] == {"eth0": {"match": {"macaddress": MAC}},
                                  "eth1": {"match": {"macaddress": MAC2}}}


BAD_NETWORK: list[tuple[Any, str, str]] = [
    ("dhcp", "params.network", "JSON object"),
    ({"mode": "bootp"}, "params.network.mode", "dhcp or static"),
    ({"mode": "dhcp", "addresses": ["192.0.2.1/24"]}, "params.network", "unknown key"),
    ({"mode": "static"}, "params.network.addresses", "JSON list"),
    ({"mode": "static", "addresses": []}, "params.network.addresses", "at least one"),
    ({"mode": "static", "addresses": ["192.0.2.10"]}, "params.network.addresses[0]",
     "CIDR form"),
    ({"mode": "static", "addresses": ["192.0.2.300/24"]}, "params.network.addresses[0]",
     "192.0.2.300/24"),
    ({"mode": "static", "addresses": ["192.0.2.0/24"]}, "params.network.addresses[0]",
     "network address"),
    ({"mode": "static", "addresses": ["192.0.2.255/24"]}, "params.network.addresses[0]",
     "broadcast address"),
    ({"mode": "static", "addresses": ["224.0.0.5/24"]}, "params.network.addresses[0]",
     "not a host address"),
    ({"mode": "static", "addresses": ["192.0.2.10/24"], "gateway4": "198.51.100.1"},
     "params.network.gateway4", "none of the IPv4 subnets 192.0.2.0/24"),
    ({"mode": "static", "addresses": ["192.0.2.10/24"], "gateway4": "192.0.2.10"},
     "params.network.gateway4", "own address"),
    ({"mode": "static", "addresses": ["192.0.2.10/24"], "gateway4": "2001:db8::1"},
     "params.network.gateway4", "an IPv4 address"),
    ({"mode": "static", "addresses": ["192.0.2.10/24"], "gateway6": "2001:db8::1"},
     "params.network.gateway6", "no IPv6 address"),
    ({"mode": "static", "addresses": ["2001:db8::10/64"], "gateway6": "2001:db9::1"},
     "params.network.gateway6", "none of the IPv6 subnets"),
    ({**STATIC_V4, "dns": {"servers": ["dns.example.com"]}}, "params.network.dns.servers[0]",
     "not an IP address"),
    ({**STATIC_V4, "dns": {"search": ["-bad-"]}}, "params.network.dns.search[0]", "RFC 1123"),
    ({**VLAN, "vlans": {"vlan100": {"id": 4095, "link": "bond0"}}},
     "params.network.vlans.vlan100.id", "1 to 4094"),
    ({**VLAN, "vlans": {"vlan100": {"id": 0, "link": "bond0"}}},
     "params.network.vlans.vlan100.id", "1 to 4094"),
    ({**VLAN, "vlans": {"vlan100": {"id": 100, "link": "bond9"}}},
     "params.network.vlans.vlan100.link", "not a bond"),
    ({**VLAN, "vlans": {"vlan100": {"id": 100, "link": MAC2}}},
     "params.network.vlans.vlan100.link", "member of bond bond0"),
    ({**BOND, "bonds": {"bond0": {"members": [MAC, MAC], "mode": "802.3ad"}}},
     "params.network.bonds.bond0.members", "listed twice"),
    ({**BOND, "bonds": {"bond0": {"members": [], "mode": "802.3ad"}}},
     "params.network.bonds.bond0.members", "at least one"),
    ({**BOND, "bonds": {"bond0": {"members": ["zz"], "mode": "802.3ad"}}},
     "params.network.bonds.bond0.members[0]", "MAC address"),
    ({**BOND, "bonds": {"bond0": {"members": [MAC, MAC2], "mode": "lacp"}}},
     "params.network.bonds.bond0.mode", "802.3ad"),
    ({**BOND, "bonds": {"bond0": {"members": [MAC], "mode": "active-backup",
                                  "lacp_rate": "fast"}}},
     "params.network.bonds.bond0.lacp_rate", "802.3ad bond"),
    ({**BOND, "bonds": {"eth7": {"members": [MAC], "mode": "active-backup"}}},
     "params.network.bonds.eth7", "choose another name"),
    ({**BOND, "bonds": {"a-very-long-bond-name": {"members": [MAC], "mode": "active-backup"}}},
     "params.network.bonds.a-very-long-bond-nam", "interface name"),
    ({**BOND, "bonds": {"bond0": {"members": [MAC2], "mode": "active-backup"},
                        "bond1": {"members": [MAC2], "mode": "active-backup"}}},
     "params.network.bonds.bond1.members", "already a member of bond0"),
    ({**BOND, "interface": "eth0"}, "params.network.interface", "member of bond bond0"),
    ({**BOND, "interface": "bond7"}, "params.network.interface", "none of"),
    ({**STATIC_V4, "gateway": "192.0.2.1"}, "params.network", "unknown key 'gateway'"),
]


@pytest.mark.parametrize(("network", "field", "words"), BAD_NETWORK)
def test_bad_network_is_refused_naming_the_key(network: Any, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_network(network, boot_mac=MAC)
    assert err.value.field == field
    assert words in err.value.message


def test_bond_members_must_be_the_machines_nics_when_they_are_known() -> None:
    parse_network(BOND, boot_mac=MAC, known_macs=frozenset({MAC, MAC2}))
    with pytest.raises(ValidationError) as err:
        parse_network(BOND, boot_mac=MAC, known_macs=frozenset({MAC}))
    assert f"{MAC2} is not a NIC of this machine" in err.value.message


# --- the other inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("web-01", "web-01"), ("WEB-01", "web-01"),
    ("web-01.dc1.example.com.", "web-01.dc1.example.com"),
    ("a", "a"), ("1host", "1host"),
])
def test_hostnames_accepted(value: str, expected: str) -> None:
    assert validate_hostname(value) == expected


@pytest.mark.parametrize("value", ["", "-web", "web-", "web_01", "web..x", "a" * 64,
                                   ".".join(["a" * 60] * 5), "web 01", "$(reboot)", 7, None])
def test_hostnames_refused(value: Any) -> None:
    with pytest.raises(ValidationError):
        validate_hostname(value)


def test_ssh_keys_accepted_normalised_and_deduplicated() -> None:
    assert validate_ssh_keys([ED25519, ECDSA, RSA, "  " + ED25519 + "  "]) == [ED25519, ECDSA, RSA]
    assert validate_ssh_keys(ED25519 + "\n\n" + RSA + "\n") == [ED25519, RSA]


@pytest.mark.parametrize(("key", "words"), [
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "does not start with a key type"),
    ("AAAAC3NzaC1lZDI1NTE5AAAAIJwBy81 me", "does not start with a key type"),
    ("ssh-ed25519", "does not start with a key type"),
    ("ssh-ed25519 AAAA!!!!", "base64 does not decode"),
    ("ssh-rsa " + ED25519.split()[1], "not a ssh-rsa public key"),
    ("ssh-ed25519 " + ED25519.split()[1][:20], "base64"),
    (ED25519 + "\nssh-rsa x", "control characters"),
    ("ssh-ed25519 " + "A" * 3000, "at most 2048"),
])
def test_ssh_keys_refused(key: str, words: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_ssh_keys([key])
    assert words in err.value.message and err.value.field == "ssh_keys[0]"


@pytest.mark.parametrize("value", [SHA512, SHA256, YESCRYPT, BCRYPT,
                                   "$6$rounds=5000$abcdefgh$" + SHA512.rsplit("$", 1)[1]])
def test_password_hashes_accepted(value: str) -> None:
    assert validate_password_hash(value) == value


@pytest.mark.parametrize("value", ["secret", "$1$abc$defghijklmnopqrstuvw", "$6$abc$short",
                                   SHA512 + "\n", "", None, "!"])
def test_password_hashes_refused_saying_how_to_make_one(value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        validate_password_hash(value)
    assert "openssl passwd -6" in err.value.message


@pytest.mark.parametrize(("text", "words"), [
    ("hostname: x\n", "first line must be '#cloud-config'"),
    ("#!/bin/sh\necho hi\n", "first line must be '#cloud-config'"),
    ("#cloud-config\n- a\n- b\n", "a YAML mapping"),
    ("#cloud-config\nkey: [unclosed\n", "not valid YAML (line"),
    ("#cloud-config\nx: " + "a" * 20000 + "\n", "at most 16384 bytes"),
    (42, "a string"),
])
def test_bad_cloud_config_text_is_refused(text: Any, words: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_cloud_config(text)
    assert words in err.value.message and err.value.field == "params.cloud_config"


def test_install_params_are_normalised_and_other_keys_pass() -> None:
    out = parse_install_params({"hostname": "Web-01.Example.COM", "ssh_keys": ED25519,
                                "password_hash": SHA512, "timezone": "UTC",
                                "network": STATIC_V4, "cloud_config": OPERATOR}, mac=MAC)
    assert out["hostname"] == "web-01.example.com" and out["ssh_keys"] == [ED25519]
    assert out["timezone"] == "UTC" and out["network"] == STATIC_V4
    with pytest.raises(ValidationError) as err:
        parse_install_params({"username": "root"}, mac=MAC)
    assert err.value.field == "params.username"


# --- the merge ----------------------------------------------------------------------------


MERGE_TABLE: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("operator sets nothing", {"hostname": "a", "runcmd": [["x"]]}, {},
     {"hostname": "a", "runcmd": [["x"]]}),
    ("operator's hostname and keys win", {"hostname": "a", "ssh_authorized_keys": ["k1"]},
     {"hostname": "b", "ssh_authorized_keys": ["k2"]},
     {"hostname": "b", "ssh_authorized_keys": ["k2"]}),
    ("our hook is appended to their lists", {"write_files": [{"path": "/ours"}],
                                             "runcmd": [["ours"]]},
     {"write_files": [{"path": "/theirs"}], "runcmd": ["theirs"]},
     {"write_files": [{"path": "/theirs"}, {"path": "/ours"}], "runcmd": ["theirs", ["ours"]]}),
    ("an empty list of theirs", {"runcmd": [["ours"]]}, {"runcmd": None},
     {"runcmd": [["ours"]]}),
    ("reporting gains our endpoint", {"reporting": {"lpmos": {"type": "webhook"}}},
     {"reporting": {"theirs": {"type": "log"}, "lpmos": {"type": "print"}}},
     {"reporting": {"theirs": {"type": "log"}, "lpmos": {"type": "webhook"}}}),
    ("their other keys pass", {"hostname": "a"}, {"packages": ["htop"]},
     {"packages": ["htop"], "hostname": "a"}),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "expected"), MERGE_TABLE,
                         ids=[n for n, _, _, _ in MERGE_TABLE])
def test_merge_cloud_config(name: str, ours: dict[str, Any], theirs: dict[str, Any],
                            expected: dict[str, Any]) -> None:
    assert merge_cloud_config(ours, theirs) == expected


def test_merge_refuses_a_hook_list_that_is_not_a_list() -> None:
    with pytest.raises(ValidationError) as err:
        merge_cloud_config({"runcmd": [["x"]]}, {"runcmd": "reboot"})
    assert err.value.field == "params.cloud_config.runcmd"
    with pytest.raises(RenderError) as rerr:
        Renderer().render("cloud-init/user-data.j2", ctx("image", make_task(
            cloud_config="#cloud-config\nruncmd: reboot\n")))
    assert "runcmd" in str(rerr.value)


# --- secrets ----------------------------------------------------------------------------------


def test_redaction_hides_the_hash_and_passwords_in_the_cloud_config() -> None:
    params = {"password_hash": SHA512, "hostname": "web-01", "cloud_config": (
        "#cloud-config\nusers:\n  - name: ops\n    hashed_passwd: $6$x$y\n    passwd: p\n"
        "    plain_text_passwd: hunter2\nchpasswd:\n  list: |\n    root:hunter2\n"
        "  users:\n    - {name: a, password: hunter2}\n")}
    out = redact_params(params)
    assert out["password_hash"] == "<set>" and out["hostname"] == "web-01"
    assert "hunter2" not in out["cloud_config"] and "$6$x$y" not in out["cloud_config"]
    doc = yaml.safe_load(out["cloud_config"])
    assert doc["users"][0] == {"name": "ops", "hashed_passwd": "<redacted>",
                               "passwd": "<redacted>", "plain_text_passwd": "<redacted>"}
    assert doc["chpasswd"] == {"list": "<redacted>",
                               "users": [{"name": "a", "password": "<redacted>"}]}
    assert params["password_hash"] == SHA512            # the input is not changed
    assert redact_params({"cloud_config": OPERATOR})["cloud_config"] == OPERATOR
    assert redact_params({}) == {} and redact_params({"password_hash": ""}) == {"password_hash": ""}


# --- every rendered cloud-config passes cloud-init's own schema check -------------------------

SEEDS: list[tuple[str, dict[str, Any]]] = [
    ("dhcp", {}),
    ("dhcp-no-keys", {"ssh_keys": []}),
    ("static-v4", {"network": STATIC_V4}),
    ("static-v6", {"network": STATIC_V6}),
    ("bond", {"network": BOND}),
    ("vlan", {"network": VLAN}),
    ("password-hash", {"password_hash": SHA512}),
    ("username", {"username": "ops", "password_hash": YESCRYPT}),
    ("fqdn", {"hostname": "web-01.dc1.example.com"}),
    ("operator-cloud-config", {"cloud_config": OPERATOR, "network": STATIC_V4}),
    ("operator-and-password", {"cloud_config": OPERATOR, "password_hash": SHA256,
                               "network": VLAN}),
    ("operator-sets-hostname-and-keys", {"cloud_config": (
        "#cloud-config\nhostname: theirs\nssh_authorized_keys: ['" + RSA + "']\n")}),
]


def schema_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "user-data"
    path.write_text(text)
    return subprocess.run(["cloud-init", "schema", "-c", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)


@needs_cloud_init
@pytest.mark.parametrize(("name", "params"), SEEDS, ids=[n for n, _ in SEEDS])
def test_every_image_seed_user_data_passes_cloud_init_schema(tmp_path: Path, name: str,
                                                             params: dict[str, Any]) -> None:
    task = make_task(**{"ssh_keys": [ED25519], **params})
    text = Renderer().render(CONFIG_TEMPLATES["image"]["user-data"], ctx("image", task))
    done = schema_check(tmp_path, text)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Valid cloud-config" in done.stdout
    doc = yaml.safe_load(text)
    # our hook is always there, after the operator's entries
    assert doc["runcmd"][-1] == ["systemctl", "start", "--no-block", "lpmos-report.service"]
    assert [f["path"] for f in doc["write_files"]][-3:] == [
        "/etc/lpmos/report.json", "/usr/local/sbin/lpmos-report",
        "/etc/systemd/system/lpmos-report.service"]
    assert doc["reporting"]["lpmos"]["endpoint"] == f"{NODE}/callback/SN-0001?token={TOKEN}"
    if "cloud_config" in params and "hostname: theirs" in params["cloud_config"]:
        assert doc["hostname"] == "theirs" and doc["ssh_authorized_keys"] == [RSA]
    elif params.get("ssh_keys") == []:
        assert "ssh_authorized_keys" not in doc
    else:
        assert doc["ssh_authorized_keys"] == [ED25519]
    if "password_hash" in params:
        assert doc["user"] == {"name": params.get("username", "debian"),
                               "hashed_passwd": params["password_hash"], "lock_passwd": False}
    else:
        assert "user" not in doc
    if params.get("cloud_config") == OPERATOR:
        assert doc["packages"] == ["htop"] and doc["runcmd"][0] == ["touch",
                                                                     "/root/operator-was-here"]
        assert doc["reporting"]["theirs"] == {"type": "log"}
    if name == "fqdn":
        assert (doc["hostname"], doc["fqdn"]) == ("web-01", "web-01.dc1.example.com")


@needs_cloud_init
@pytest.mark.parametrize("params", [{}, {"cloud_config": OPERATOR, "password_hash": SHA512,
                                         "network": BOND}])
def test_autoinstall_and_its_embedded_user_data_pass_cloud_init_schema(
        tmp_path: Path, params: dict[str, Any]) -> None:
    text = Renderer().render(CONFIG_TEMPLATES["ubuntu"]["user-data"],
                             ctx("ubuntu", make_task(**params)))
    done = schema_check(tmp_path, text)
    assert done.returncode == 0, done.stderr + done.stdout
    embedded = yaml.safe_load(text)["autoinstall"]["user-data"]
    done = schema_check(tmp_path, "#cloud-config\n" + yaml.safe_dump(embedded))
    assert done.returncode == 0, done.stderr + done.stdout
    assert embedded["reporting"]["lpmos"]["type"] == "webhook"


@needs_cloud_init
@pytest.mark.parametrize(("name", "network", "expected"), NETWORK_TABLE,
                         ids=[n for n, _, _ in NETWORK_TABLE])
@pytest.mark.parametrize("renderer", ["eni", "networkd"])
def test_every_network_config_converts_with_cloud_init(tmp_path: Path, name: str, network: Any,
                                                       expected: dict[str, Any],
                                                       renderer: str) -> None:
    text = Renderer().render(CONFIG_TEMPLATES["image"]["network-config"],
                             ctx("image", make_task(network=network)))
    (tmp_path / "network-config").write_text(text)
    done = subprocess.run(["cloud-init", "devel", "net-convert", "-p",
                           str(tmp_path / "network-config"), "-k", "yaml", "-d",
                           str(tmp_path / "out"), "-D", "debian", "-O", renderer],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    written = "\n".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    for gateway in ("gateway4", "gateway6"):
        if isinstance(network, dict) and network.get(gateway):
            assert network[gateway] in written


# --- the schema check itself -----------------------------------------------------------------


@needs_cloud_init
def test_check_cloud_config_quotes_cloud_init() -> None:
    check_cloud_config("#cloud-config\nhostname: web-01\n")
    with pytest.raises(CloudConfigRejected) as err:
        check_cloud_config("#cloud-config\nhostname: 5\nruncmd: reboot\n")
    message = str(err.value)
    assert message.startswith("params.cloud_config: Cloud config schema errors:")
    assert "hostname: 5 is not of type 'string'" in message
    assert "runcmd: 'reboot' is not of type 'array'" in message
    assert "/tmp" not in message


def test_check_cloud_config_says_what_to_install_without_cloud_init() -> None:
    with pytest.raises(SchemaCheckUnavailable) as err:
        check_cloud_config("#cloud-config\n", command="cloud-init-not-installed-here")
    assert "install Debian's cloud-init package for schema validation" in str(err.value)


@pytest.mark.parametrize(("output", "expected"), [
    ("Cloud config schema deprecations: \nError:\nCloud config schema errors: a: b\n",
     "Cloud config schema errors: a: b"),
    ("Error:\nCloud config schema errors: format-l1.c1: File x needs to begin with "
     "\"#cloud-config\"\n", "Cloud config schema errors: format-l1.c1: File x needs to begin "
     "with \"#cloud-config\""),
    ("Error: something else\n", "Error: something else"),
    ("", "cloud-init schema rejected the document"),
])
def test_schema_message(output: str, expected: str) -> None:
    assert schema_message(output) == expected
