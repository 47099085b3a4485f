"""GRUB for Secure Boot machines, the pure parts: which URLs GRUB 2.06 can
fetch, the constant config, the quoting filters, the template of each
decision, the node's refusal to offer GRUB it cannot serve."""

from __future__ import annotations

import pytest

from bootsvc.dhcp.settings import SETTINGS as DHCP_SETTINGS
from bootsvc.http.settings import SETTINGS as HTTP_SETTINGS
from bootsvc.node import check_grub_reachable
from bootsvc.policy.script import INSTALL_TEMPLATES, TEMPLATES, loader_template
from bootsvc.render import RenderError, Renderer, build_context
from bootsvc.settings import NODE_SETTINGS
from bootsvc.tftp.chain import (
    GrubUrlError,
    grub_http_device,
    render_grub_config,
    transfer_stage,
)
from lpmos.catalog import Image
from lpmos.config import COMMON, Config, ConfigError, resolve, settings_by_key


@pytest.mark.parametrize("url, device", [
    ("http://10.77.0.1", "(http,10.77.0.1)"),
    ("http://10.77.0.1:80/", "(http,10.77.0.1)"),
    ("http://boot-1.dc1.example/lpmos", "(http,boot-1.dc1.example)"),
])
def test_urls_grub_can_fetch(url: str, device: str) -> None:
    assert grub_http_device(url) == device


@pytest.mark.parametrize("url", [
    "http://10.77.0.1:8081", "https://10.77.0.1", "tftp://10.77.0.1/x", "http://[fd77::1]/",
    "http://10.77.0.1:99999/", "http:///x", "http://a,b/",
])
def test_urls_grub_cannot_fetch_are_refused(url: str) -> None:
    with pytest.raises(GrubUrlError):
        grub_http_device(url)


def test_constant_config_keeps_the_node_path_and_loops() -> None:
    text = render_grub_config("http://10.0.0.5/lpmos").decode()
    assert 'source "(http,10.0.0.5)/lpmos/grub/${net_default_mac}.cfg"' in text
    assert text.count("while [ 1 = 1 ]; do") == 1 and text.rstrip().endswith("done")
    with pytest.raises(GrubUrlError):
        render_grub_config("http://10.0.0.5:8081")


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
    assert env.from_string("{{ v | grub_url }}").render(
        v="http://h/p?token=a'b") == "'(http,h)/p?token=a'\\''b'"


def test_discovery_config_renders_and_a_port_grub_cannot_use_is_a_render_error() -> None:
    renderer = Renderer()
    image = Image(name="live", os_type="LPMOS live", os_family="lab", role="live",
                  mode="installer", kernel="live/vmlinuz", initrd="live/initrd.img")
    ctx = build_context(node_url="http://10.77.0.1", idc="dc1", node_name="n1",
                        decision="discovery", reason="no task: discovery",
                        mac="52:54:00:00:00:01", live=image, live_kernel_args="console=ttyS0")
    text = renderer.render("grub/discovery.cfg.j2", ctx)
    assert "linux '(http,10.77.0.1)/images/live/vmlinuz' 'console=ttyS0'" in text
    ctx = build_context(node_url="http://10.77.0.1:8081", idc="dc1", node_name="n1",
                        decision="discovery", reason="r", mac="52:54:00:00:00:01", live=image)
    with pytest.raises(RenderError, match="port 80"):
        renderer.render("grub/discovery.cfg.j2", ctx)


def _config(**values: str) -> Config:
    settings = settings_by_key([COMMON, NODE_SETTINGS, DHCP_SETTINGS, HTTP_SETTINGS])
    return resolve(settings, values, environ={}, config_file=None)


def test_a_node_offering_grub_needs_port_80() -> None:
    shim = _config(dhcp__bootfile_efi64="shimx64.efi")
    with pytest.raises(ConfigError, match="--http-port 80"):
        check_grub_reachable(shim, "http://10.77.0.1:8081")
    check_grub_reachable(shim, "http://10.77.0.1")            # port 80: fine
    check_grub_reachable(_config(), "http://10.77.0.1:8081")  # iPXE: any port
    # a node that serves no boot HTTP has no GRUB configs to give either way
    check_grub_reachable(_config(dhcp__bootfile_efi64="shimx64.efi",
                                 regional__services="dhcp,tftp"), "http://10.77.0.1:8081")
