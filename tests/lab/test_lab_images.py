"""The image builds and the lab runner, below the full end-to-end test:

* the initramfs cpio writer (pure; checked with GNU cpio);
* the build cache: a second build with nothing changed rebuilds nothing;
* the live image's contents: the agent, busybox init, the kernel modules;
* the lab OS boots from its disk under SeaBIOS and under OVMF, finds its
  NoCloud seed and POSTs the first-boot callback with the seed's token
  (QEMU user networking restricted to a forward to a loopback server);
* the lab runner's segment boots a VM to our node's iPXE script, and after a
  failure inside the lab nothing it created is left.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from images import build
from lab.process import run as _run
from lab.runner import Lab, LabError
from tests.lab.conftest import build_lock, require_lab_host

MIB = 1 << 20


def test_cpio_writer_round_trips_files_links_and_directory_links(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.fail("cpio missing: run 'scripts/setup.sh system'")
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "usr" / "bin" / "tool", 0o755)
    (root / "bin").symlink_to("usr/bin")                 # a link to a directory
    (root / "init").symlink_to("/usr/bin/tool")
    (root / "odd").write_bytes(b"x" * 5)                 # needs padding
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as fh:
        count = build.write_cpio(root, fh)
    assert count == 6
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(archive)], cwd=out, check=True)
    assert (out / "usr" / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.stat(out / "usr" / "bin" / "tool").st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin") == "usr/bin"
    assert os.readlink(out / "init") == "/usr/bin/tool"
    assert (out / "odd").read_bytes() == b"xxxxx"
    assert os.stat(out / "odd").st_mtime == build.SOURCE_DATE_EPOCH
    # the same tree packs to the same bytes
    again = tmp_path / "b.cpio"
    with again.open("wb") as fh:
        build.write_cpio(root, fh)
    assert again.read_bytes() == archive.read_bytes()


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.timeout(900)   # the first build: debootstrap, kernel download, packing
def test_builds_are_cached_and_contain_the_agent(lab_images: dict[str, Path]) -> None:
    live, lab_os = lab_images["live"], lab_images["lab-os"]
    stamps = {p: (p / ".stamp").read_text() for p in (live, lab_os)}
    mtimes = {p: (p / name).stat().st_mtime_ns
              for p, name in ((live, "initrd.img"), (lab_os, "lab-os.img"))}
    with build_lock():
        assert build.build_live() == live and build.build_lab_os() == lab_os
    assert {p: (p / ".stamp").read_text() for p in stamps} == stamps
    assert {p: (p / name).stat().st_mtime_ns
            for p, name in ((live, "initrd.img"), (lab_os, "lab-os.img"))} == mtimes
    manifest = json.loads((live / "manifest.json").read_text())
    assert manifest["initrd_sha256"] == build.sha256_file(live / "initrd.img")
    listing = subprocess.run(f"zstd -dc {live / 'initrd.img'} | cpio -t --quiet", shell=True,
                             capture_output=True, text=True, check=True).stdout.split()
    for wanted in ("init", "opt/lpmos/agent/runner.py", "opt/lpmos/lpmos/models.py",
                   "etc/inittab", "usr/bin/python3.11", "usr/bin/mcopy",
                   "usr/lib/x86_64-linux-gnu/gconv/IBM850.so"):
        assert wanted in listing, wanted
    assert any(name.endswith("/virtio_net.ko") for name in listing)
    assert not any(name.startswith("usr/share/doc/") for name in listing)
    digest = (lab_os / "lab-os.img.sha256").read_text().split()[0]
    assert digest == build.sha256_file(lab_os / "lab-os.img")
    layout = subprocess.run(["sfdisk", "--json", str(lab_os / "lab-os.img")],
                            capture_output=True, text=True, check=True).stdout
    parts = json.loads(layout)["partitiontable"]["partitions"]
    assert [p.get("name") for p in parts] == ["lab-os-boot", "cidata"]


class _Callbacks(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append({"path": self.path, "auth": self.headers.get("Authorization"),
                              "body": json.loads(body or b"{}")})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"task_status": "succeeded"}')

    def log_message(self, *args: Any) -> None:
        pass


def _seeded_disk(lab_os: Path, dest: Path, files: dict[str, str]) -> None:
    shutil.copyfile(lab_os / "lab-os.img", dest)
    with dest.open("r+b") as fh:
        fh.truncate(1 << 30)
    layout = json.loads(subprocess.run(["sfdisk", "--json", str(dest)], capture_output=True,
                                       text=True, check=True).stdout)
    seed = next(p for p in layout["partitiontable"]["partitions"] if p.get("name") == "cidata")
    for name, text in files.items():
        local = dest.parent / name
        local.write_text(text)
        subprocess.run(["mcopy", "-o", "-i", f"{dest}@@{seed['start'] * 512}", str(local),
                        f"::/{name}"], check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.timeout(600)
def test_lab_os_boots_from_disk_under_bios_and_uefi_and_calls_back(
        lab_images: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("busybox") is None:
        pytest.fail("busybox missing: run 'scripts/setup.sh system'")
    _Callbacks.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Callbacks)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://10.0.2.100:8081"
    seeds = {
        # the node's meta-data carries an lpmos block; user-data without a URL
        "bios": {"meta-data": f"instance-id: lpmos-LAB-B-1\nlpmos:\n  sn: LAB-B\n"
                              f"  callback: {url}/callback/LAB-B\n  token: tok-bios_123\n",
                 "user-data": "#cloud-config\nhostname: lab-b\n"},
        # only a curl command with the Bearer header in user-data
        "uefi": {"meta-data": "instance-id: lpmos-LAB-U-1\n",
                 "user-data": "#cloud-config\nruncmd:\n- curl -fsS -X POST -H 'Authorization:"
                              f" Bearer tok-uefi-456' {url}/callback/LAB-U\n"},
    }
    procs = {}
    try:
        for fw, files in seeds.items():
            disk = tmp_path / f"{fw}.img"
            _seeded_disk(lab_images["lab-os"], disk, files)
            cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic",
                   "-monitor", "none", "-serial", f"file:{tmp_path / (fw + '.log')}",
                   "-drive", f"file={disk},format=raw,if=virtio",
                   "-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8081-"
                              f"cmd:busybox nc 127.0.0.1 {port}",
                   "-device", "virtio-net-pci,netdev=n0,romfile="]
            if fw == "uefi":
                shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", tmp_path / "vars.fd")
                cmd += ["-machine", "q35", "-drive", "if=pflash,format=raw,unit=0,readonly=on,"
                        "file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                        "-drive", f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}"]
            procs[fw] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and len(_Callbacks.received) < 2:
            time.sleep(1)
        logs = {fw: (tmp_path / f"{fw}.log").read_bytes().decode(errors="replace")[-3000:]
                for fw in seeds}
        got = {c["path"]: c for c in _Callbacks.received}
        assert set(got) == {"/callback/LAB-B", "/callback/LAB-U"}, logs
        assert got["/callback/LAB-B"]["auth"] == "Bearer tok-bios_123"
        assert got["/callback/LAB-U"]["auth"] == "Bearer tok-uefi-456"
        for path, fw in (("/callback/LAB-B", "bios"), ("/callback/LAB-U", "uefi")):
            body = got[path]["body"]
            assert body["event"] == "firstboot" and body["status"] == "succeeded"
            assert f"({fw})" in body["message"], logs[fw]
            assert "booted from disk (6." in logs[fw] and f"firmware {fw})" in logs[fw]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(20)
        server.shutdown()
        server.server_close()       # shutdown() alone leaves the socket listening


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.lab
@pytest.mark.timeout(600)
def test_lab_boots_to_our_ipxe_script_and_leaves_nothing_after_a_failure(
        lab_images: dict[str, Path], tmp_path: Path) -> None:
    require_lab_host()
    lab = Lab(tmp_path / "lab")
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="failure inside the lab"), lab:
        seen["pids"] = [p.pid for p in (lab.node_proc, lab.dnsmasq_proc, lab.etcd_proc) if p]
        seen["namespaces"] = [lab.ns, lab.site_ns]
        names = _run(["ip", "netns", "list"]).stdout
        assert lab.ns in names and lab.site_ns in names
        vm = lab.boot_vm("probe", firmware="bios")
        seen["pids"].append(vm.proc.pid)  # type: ignore[union-attr]
        try:
            vm.wait_for("decision", 240)    # SeaBIOS → iPXE → ProxyDHCP → our script
        except LabError as exc:
            pytest.fail(str(exc))
        assert vm.seen("boot-script") is not None
        assert "discovery" in vm.seen("decision").line  # type: ignore[union-attr]
        raise RuntimeError("failure inside the lab")
    names = _run(["ip", "netns", "list"]).stdout
    for ns in seen["namespaces"]:
        assert ns not in names
    assert _run(["ip", "link", "show", lab.host_if], check=False).returncode != 0
    for pid in seen["pids"]:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z", pid


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.timeout(1200)   # the first build: debootstrap and apt-get install, then ~75 s
def test_debian_cloud_image_is_cached_reproducible_and_shaped_like_a_cloud_image(
        cloud_image: Path, tmp_path: Path) -> None:
    name = "debian-12-generic-amd64"
    stamp = (cloud_image / ".stamp").read_text()
    with build_lock():
        started = time.monotonic()
        assert build.build_debian_cloud() == cloud_image
        assert time.monotonic() - started < 30, "a build with nothing changed must take seconds"
    assert (cloud_image / ".stamp").read_text() == stamp
    manifest = json.loads((cloud_image / "manifest.json").read_text())
    for ext in ("raw", "qcow2", "raw.zst"):
        digest = (cloud_image / f"{name}.{ext}.sha256").read_text().split()[0]
        assert digest == manifest["files"][f"{name}.{ext}"]["sha256"]
    assert build.sha256_file(cloud_image / f"{name}.raw") == manifest["files"][f"{name}.raw"][
        "sha256"]
    raw = cloud_image / f"{name}.raw"
    assert raw.stat().st_size == 2 << 30
    # like a distribution's image: BIOS boot, ESP, root last; no cidata
    parts = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert parts["label"] == "gpt"
    assert [p.get("name") for p in parts["partitions"]] == ["bios", "esp", "root"]
    esp = parts["partitions"][1]
    listing = subprocess.run(["mdir", "-b", "-/", "-i", f"{raw}@@{esp['start'] * 512}", "::/"],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    for wanted in ("::/EFI/BOOT/BOOTX64.EFI", "::/EFI/BOOT/grubx64.efi", "::/EFI/debian/grub.cfg",
                   "::/EFI/debian/shimx64.efi"):
        assert wanted in listing, listing
    assert "fbx64" not in listing.lower()     # shim's fallback would reorder the boot entries
    with raw.open("rb") as fh:
        mbr = fh.read(512)
    assert mbr[510:] == b"\x55\xaa" and mbr[:2] != b"\0\0"     # GRUB's boot code in the MBR
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(cloud_image / f"{name}.qcow2")], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 2 << 30
    assert "backing-filename" not in info
    assert (cloud_image / f"{name}.qcow2").stat().st_size < 600 * MIB
    # the same inputs give the same bytes: a forced rebuild elsewhere
    side = tmp_path / "side"
    with build_lock():      # it rebuilds the stages in the shared cache
        subprocess.run([sys.executable, "-c", "from images import build; "
                        "build.build_debian_cloud(force=True)"],
                       env=dict(os.environ, LPMOS_IMAGE_OUT=str(side)), check=True,
                       cwd=build.__file__.rsplit("/images/", 1)[0], capture_output=True)
    for ext in ("raw", "qcow2", "raw.zst"):
        assert (side / "debian-12" / f"{name}.{ext}.sha256").read_text() == \
            (cloud_image / f"{name}.{ext}.sha256").read_text(), ext


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.timeout(900)
def test_debian_image_boots_signed_with_secure_boot_on(cloud_image: Path,
                                                       tmp_path: Path) -> None:
    """The same disk that BIOS and plain UEFI machines boot in the real-OS lab
    test also boots with Secure Boot enforced (OVMF with Microsoft's keys
    enrolled): shim (signed by Microsoft) → Debian's signed GRUB → Debian's
    signed kernel, locked down; cloud-init finds the seed the agent added.
    The disk is written by the agent's own install code from the raw.zst,
    as a machine's would be (no network here: the seed is all it needs)."""
    from agent.install import FileImageSource, install_image, parse_install

    name = "debian-12-generic-amd64.raw.zst"
    published = cloud_image / name
    digest = (cloud_image / f"{name}.sha256").read_text().split()[0]
    spec = parse_install({
        "mode": "image", "image": "debian-12-generic-zst", "image_url": "http://n/x",
        "sha256": digest, "size": published.stat().st_size, "format": "raw.zst",
        "disk_size": 2 << 30,
        "seed": {"meta-data": "instance-id: lpmos-SB-1\nlocal-hostname: sb-check\n",
                 "user-data": "#cloud-config\nhostname: sb-check\n"}})
    disk = tmp_path / "disk.img"
    install_image(FileImageSource(published), spec, disk, report=lambda e: None,
                  allow_removable=False, disk_size=3 << 30)
    vars_fd = tmp_path / "OVMF_VARS.ms.fd"
    shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.ms.fd", vars_fd)
    log = tmp_path / "serial.log"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,smm=on", "-m", "1024",
           "-global", "driver=cfi.pflash01,property=secure,value=on",
           "-drive", "if=pflash,format=raw,unit=0,readonly=on,"
                     "file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
           "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
           "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe", "-nic", "none",
           "-nographic", "-monitor", "none", "-serial", f"file:{log}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wanted = ("secureboot: Secure boot enabled", "Kernel is locked down from EFI Secure Boot",
              "Cloud-init v. 22", "sb-check login:")
    try:
        deadline = time.monotonic() + 600
        text = ""
        while time.monotonic() < deadline:
            text = log.read_bytes().decode(errors="replace") if log.exists() else ""
            if all(w in text for w in wanted) and "finished at" in text:
                break
            assert proc.poll() is None, f"QEMU exited:\n{text[-3000:]}"
            time.sleep(2)
        missing = [w for w in wanted if w not in text]
        assert not missing, f"{missing} not on the console:\n{text[-4000:]}"
        assert "Access Denied" not in text and "Verification failed" not in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(20)
