#!/usr/bin/env bash
# Install what LPMOS needs on a fresh Debian 12 machine, only what is missing:
#   scripts/setup.sh system   -> Debian packages (apt-get), as root
#   scripts/setup.sh venv     -> .venv with the project and its Python dependencies
#   scripts/setup.sh versions -> notes on packages whose version differs from the checked one
# Both are idempotent and fast when nothing changed (stamp files in .venv/).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(
  etcd-server etcd-client        # the system of record (embedded default and tests)
  ipxe                           # undionly.kpxe, ipxe.efi, snponly.efi served over TFTP
  qemu-system-x86 ovmf           # the QEMU lab: BIOS (SeaBIOS) and UEFI (OVMF) VMs
  dnsmasq-base                   # the site's DHCP server in the lab; reference in benchmarks
  radvd                          # the site's IPv6 router on the IPv6-only lab segment (tests/lab/test_lab_ipv6.py)
  tftpd-hpa tftp-hpa atftp curl  # TFTP reference server and real TFTP clients in tests
  busybox udhcpc isc-dhcp-client # real DHCP clients in tests
  iproute2 iptables openssl      # network namespaces, veths, bridges; test certificates
  strace                         # the filesystem audit of a whole node run (tests/integration/test_fs_audit.py)
  chromium                       # browser tests (driven by Playwright, never downloaded)
  debootstrap cpio zstd squashfs-tools xz-utils   # live-image and lab-OS builds
  kmod syslinux syslinux-common grub-efi-amd64-bin  # images/build.py: modules, BIOS/UEFI boot loaders
  shim-signed grub-efi-amd64-signed  # Secure Boot network boot: Microsoft-signed shim, Debian-signed GRUB (TFTP root)
  qemu-system-arm qemu-efi-aarch64  # the arm64 lab: qemu-system-aarch64 (TCG) with AAVMF, its UEFI firmware
  qemu-user-static               # arm64 image build: runs the arm64 ldconfig and busybox --list by name (no binfmt_misc)
  vagrant vagrant-libvirt        # the Vagrant libvirt lab (Vagrantfile; 'vagrant validate' test)
  mtools dosfstools fdisk        # agent: NoCloud seed into the image FAT (mcopy), test fixtures (mkfs.vfat, sfdisk)
  gdisk                          # agent release: sgdisk --zap-all (tests/integration/test_release_*.py on loop devices)
  e2fsprogs qemu-utils           # the real Debian image: mkfs.ext4 -d (no loop device), qemu-img (qcow2)
  cloud-init                     # 'cloud-init schema': the operator's cloud-config is checked with cloud-init's own validator
  openssh-client                 # the lab logs in to installed systems over SSH
  nginx-light                    # reference server of bench/image_bench.py: the same disk image with sendfile
  prometheus                     # promtool: the tests check every /metrics exposition with 'promtool check metrics'
  slapd ldap-utils               # LDAP sign-in tests: a real slapd the test starts (StartTLS, certificates made in the test)
  debhelper dh-virtualenv dpkg-dev  # the Debian package of LPMOS (packaging/debian, built and installed by a test)
  systemd adduser                # that test: 'systemd-analyze verify' of the units (no systemd need run); the package's postinst
  python3-venv python3-dev gcc   # the virtualenv
  libvirt-daemon-system libvirt-clients  # power tests: libvirtd (started by the test) runs the TCG domains behind the BMC emulators; virsh
  libvirt-dev pkg-config         # pip builds libvirt-python (sushy-tools' and virtualbmc's libvirt driver) against them
)

# Versions the lab and the tests were last run green with. The lab depends on
# these packages' behaviour (firmware boot order, iPXE ROMs, etcd's API, the
# browser Playwright drives), so setup says when it finds another version; it
# never pins one. A new version is usually fine: run 'make test' and update
# the line when it passes.
CHECKED_VERSIONS=(
  "qemu-system-x86 1:7.2+dfsg-7+deb12u18+b3"
  "ovmf 2022.11-6+deb12u2"
  "qemu-efi-aarch64 2022.11-6+deb12u2"
  "qemu-system-arm 1:7.2+dfsg-7+deb12u18+b3"
  "ipxe 1.0.0+git-20190125.36a4c85-5.1"
  "ipxe-qemu 1.0.0+git-20190125.36a4c85-5.1"
  "etcd-server 3.4.23-4+b4"
)

check_versions() {
  local line p want have
  for line in "${CHECKED_VERSIONS[@]}"; do
    p=${line%% *}; want=${line#* }
    have=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) || continue
    if [[ "$have" != "$want" ]]; then
      echo "setup: note: $p is $have; the lab and tests were last checked with $want" \
           "(not pinned: if a lab test fails, compare with that version)" >&2
    fi
  done
}

system() {
  local missing=()
  for p in "${SYSTEM_PACKAGES[@]}"; do
    [[ "$p" == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]]; then
      echo "setup: missing Debian packages: ${missing[*]}; run as root or install them" >&2
      exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Packages such as slapd and prometheus start their daemon on install; we
    # never use those (tests start their own, on their own ports), so no
    # service may start while we install (policy-rc.d, removed afterwards).
    local policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\n# lpmos setup.sh: no service starts during install\nexit 101\n' > "$policy"
      chmod 755 "$policy"
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" || { [[ -n $policy ]] && rm -f "$policy"; exit 1; }
    [[ -n $policy ]] && rm -f "$policy"
    # tftpd-hpa ships a service we never use (tests start their own); keep it off
    if command -v systemctl >/dev/null && systemctl is-active --quiet tftpd-hpa 2>/dev/null; then
      systemctl disable --now tftpd-hpa || true
    fi
  fi
}

venv() {
  local py=${PYTHON:-python3}
  local stamp=.venv/.lpmos-stamp
  local want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(cat $stamp) == "$want" && -x .venv/bin/lpmos ]]; then
    return 0
  fi
  echo "setup: building .venv with the project and its Python dependencies"
  [[ -x .venv/bin/python ]] || "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > $stamp
}

case "${1:-all}" in
  system) system; check_versions ;;
  venv) venv ;;
  all) system; check_versions; venv ;;
  versions) check_versions ;;
  *) echo "usage: $0 [system|venv|all|versions]" >&2; exit 2 ;;
esac
