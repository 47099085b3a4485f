#!/usr/bin/env bash
# Build the lpmos Debian package from this source tree:
#   packaging/build-deb.sh [OUTDIR]        (default OUTDIR: build/deb, git-ignored)
# dpkg-buildpackage wants debian/ at the source root, and the repository keeps
# its packaging in packaging/debian, so the tracked and untracked (not ignored)
# files are copied to a temporary tree with debian/ at its root, built there
# with 'dpkg-buildpackage -us -uc -b', and the .deb is moved to OUTDIR.
# Needs: debhelper, dh-virtualenv, dpkg-dev, python3-venv (scripts/setup.sh
# system) and PyPI (the virtualenv's dependencies).  Prints the .deb's path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$here/build/deb}" && cd "${1:-$here/build/deb}" && pwd)
for tool in dpkg-buildpackage dh dh_virtualenv; do
    command -v "$tool" >/dev/null || {
        echo "build-deb: $tool is missing: run scripts/setup.sh system" >&2; exit 1; }
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lpmos-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src=$tmp/lpmos
mkdir -p "$src"
cd "$here"
# the working tree as git sees it (no .venv, build outputs or caches)
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$src"
rm -rf "$src/debian"
cp -a packaging/debian "$src/debian"
cd "$src"
log=$tmp/build.log
if ! dpkg-buildpackage -us -uc -b >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "build-deb: dpkg-buildpackage failed (last lines above)" >&2
    exit 1
fi
version=$(dpkg-parsechangelog -S Version)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=lpmos_${version}_${arch}.deb
mv "$tmp/$deb" "$out/$deb"
echo "$out/$deb"
