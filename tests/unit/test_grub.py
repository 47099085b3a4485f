"""GRUB for Secure Boot machines, the pure parts: which URLs GRUB 2.06 can
fetch, the constant config, the quoting filters, the template of each
decision, the node's refusal to offer GRUB it cannot serve."""

from __future__ import annotations

import pytest

from bootsvc.dhcp.settings import SETTINGS as DHCP_SETTINGS
from bootsvc.http.settings import SETTINGS as HTTP_SETTINGS
from bootsvc.node import grub_warnings
from bootsvc.policy.script import INSTALL_TEMPLATES, TEMPLATES, loader_template
from bootsvc.render import Renderer, build_context
from bootsvc.settings import NODE_SETTINGS
from bootsvc.tftp.chain import GRUB_MACHINE_RE, render_grub_config, transfer_stage
from lpmos.catalog import Image
from lpmos.config import COMMON, Config, resolve, settings_by_key


def test_constant_config_runs_the_machine_config_from_its_server_and_loops() -> None:
    text = render_grub_config().decode()
    assert 'source "$prefix/${net_default_mac}.cfg"' in text
    assert text.count("while [ 1 = 1 ]; do") == 1 and text.rstrip().endswith("done")
    assert "menuentry" not in text


@pytest.mark.parametrize("name, ok", [
    ("grub/52:54:00:aa:bb:cc.cfg", True),
    ("grub/52:54:00:AA:BB:CC.cfg", True),
    ("grub/52-54-00-aa-bb-cc.cfg", False),
    ("grub/grub.cfg", False),
    ("grub/52:54:00:aa:bb:cc.cfg.x", False),
])
def test_machine_config_names(name: str, ok: bool) -> None:
    assert bool(GRUB_MACHINE_RE.fullmatch(name)) is ok


def test_loader_files_have_their_own_timeline_stage() -> None:
    assert transfer_stage("shimx64.efi") == "loader shim"
    assert transfer_stage("grubx64.efi") == "loader grub"
    assert transfer_stage("grub/grub.cfg") == "grub.cfg"
    assert transfer_stage("ipxe.efi") == "loader ipxe"
    assert transfer_stage("pxelinux.cfg/default") == "tftp"


def test_every_decision_has_a_grub_template() -> None:
    renderer = Renderer()
    for template in [*TEMPLATES.values(), *INSTALL_TEMPLATES.values()]:
        grub = loader_template(template, "grub")
        assert grub.startswith("grub/") and grub.endswith(".cfg.j2")
        assert renderer.exists(grub), grub
    assert loader_template("ipxe/wait.ipxe.j2", "ipxe") == "ipxe/wait.ipxe.j2"
    assert loader_template("ipxe/install-image.ipxe.j2", "grub") == "grub/install-image.cfg.j2"


@pytest.mark.parametrize("value, quoted", [
    ("plain", "'plain'"),
    ("a b", "'a b'"),
    ("$root;reboot", "'$root;reboot'"),
    ("it's", "'it'\\''s'"),
    ("{x}", "'{x}'"),
])
def test_grub_filter_quotes_one_word(value: str, quoted: str) -> None:
    out = Renderer().env.from_string("{{ v | grub }}").render(v=value)
    assert out == quoted


def test_grub_filters_refuse_or_neutralise_control_characters() -> None:
    env = Renderer().env
    with pytest.raises(ValueError):
        env.from_string("{{ v | grub }}").render(v="a\nreboot")
    assert env.from_string("{{ v | grub_args }}").render(v="a\nreboot") == "'a' 'reboot'"
    assert env.from_string("{{ v | grub_text }}").render(v="x'; $y\n") == "'x?? ?y?'"
    image = {"name": "live", "kernel": "build/live/vmlinuz", "initrd": "https://x/initrd"}
    assert env.from_string("{{ v | grub_file('kernel') }}").render(v=image) == \
        "'/images/live/vmlinuz'"
    with pytest.raises(ValueError, match="loads only from the node's TFTP"):
        env.from_string("{{ v | grub_file('initrd') }}").render(v=image)


def test_discovery_config_loads_the_live_image_over_tftp() -> None:
    image = Image(name="live", os_type="LPMOS live", os_family="lab", role="live",
                  mode="installer", kernel="live/vmlinuz", initrd="live/initrd.img")
    ctx = build_context(node_url="http://10.77.0.1:8081", idc="dc1", node_name="n1",
                        decision="discovery", reason="no task: discovery",
                        mac="52:54:00:00:00:01", live=image, live_kernel_args="console=ttyS0")
    text = Renderer().render("grub/discovery.cfg.j2", ctx)
    assert "linux '/images/live/vmlinuz' 'console=ttyS0'" in text
    assert "'lpmos.server=http://10.77.0.1:8081'" in text
    assert "initrd '/images/live/initrd.img'" in text


def _config(**values: str) -> Config:
    settings = settings_by_key([COMMON, NODE_SETTINGS, DHCP_SETTINGS, HTTP_SETTINGS])
    return resolve(settings, values, environ={}, config_file=None)


def test_a_proxy_node_offering_grub_says_what_the_site_dhcp_must_do() -> None:
    warned = grub_warnings(_config(dhcp__bootfile_efi64="shimx64.efi"))
    assert len(warned) == 1 and "next-server" in warned[0] and "--dhcp-mode full" in warned[0]
    assert grub_warnings(_config(dhcp__bootfile_efi64="shimx64.efi", dhcp__mode="full",
                                 dhcp__range="10.0.0.10-10.0.0.20")) == []
    assert grub_warnings(_config()) == []                       # iPXE
