"""The agent's image write throughput against the standard tools, in one run.

For each published format the agent deploys (raw, qcow2, raw.zst) the same
image is written to a file on the same file system by

* ours: :func:`agent.install.write_image` (the decoder, sha256 over the
  published bytes, coalesced writes, zero ranges punched), reading the
  published file through :class:`agent.install.FileImageSource`, then ``fsync``;
* the reference: ``dd bs=4M conv=sparse,fsync`` (raw), ``qemu-img convert
  -O raw`` then ``fsync`` (qcow2), ``zstd -dc | dd bs=4M conv=sparse,fsync``
  (raw.zst) — the tools an operator would use by hand — alone, and with a
  sha256 of the published file (``openssl dgst -sha256``) beside it
  (``+sha256``: ours always checks the digest, the tools do not);

alternating ours and the reference, each the median of ``--repeat`` runs,
from a warm page cache for the source (both read the same file).  The
ratio is ours' throughput over the reference's (> 1: ours is faster).  The
image is the real Debian 12 image when it is built (images/build/debian-12),
else (and with ``--quick``) a generated cloud-like disk: GPT, random data
and holes.

    python -m bench.image_write_bench [--quick] [--repeat N] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.install import FileImageSource, open_target, write_image  # noqa: E402
from lpmos.testing import write_cloud_like_disk  # noqa: E402

MIB = 1 << 20
BUILT = REPO / "images" / "build" / "debian-12"
NAME = "debian-12-generic-amd64"
FORMATS = ("raw", "qcow2", "raw.zst")
#: a run may take at most this long (a stuck tool fails the bench, not the machine)
RUN_TIMEOUT = 900.0


def make_images(tmp: Path, size_mib: int) -> dict[str, Path]:
    """A generated cloud-like disk of ``size_mib`` and its qcow2/raw.zst forms."""
    raw = tmp / "gen.raw"
    # a third random, the rest holes, in 4 MiB runs
    write_cloud_like_disk(raw, size=size_mib * MIB, esp_sectors=8192,
                          data=[(at, 4 * MIB) for at in
                                range(8 * MIB, size_mib * MIB - 4 * MIB, 12 * MIB)])
    return convert(raw, tmp)


def convert(raw: Path, tmp: Path) -> dict[str, Path]:
    out = {"raw": raw, "qcow2": tmp / "image.qcow2", "raw.zst": tmp / "image.raw.zst"}
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", str(raw),
                    str(out["qcow2"])], check=True, timeout=RUN_TIMEOUT)
    subprocess.run(["zstd", "-q", "-T0", "-10", "-f", str(raw), "-o", str(out["raw.zst"])],
                   check=True, timeout=RUN_TIMEOUT)
    return out


def built_images() -> dict[str, Path] | None:
    paths = {fmt: BUILT / f"{NAME}.{fmt}" for fmt in FORMATS}
    return paths if all(p.exists() for p in paths.values()) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(4 * MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_ours(fmt: str, src: Path, digest: str, target: Path) -> float:
    target.unlink(missing_ok=True)
    started = time.monotonic()
    with open_target(target, size=0, allow_removable=False) as tgt:
        write_image(FileImageSource(src), tgt, size=src.stat().st_size, sha256=digest,
                    report=lambda event: None, fmt=fmt)
        os.fsync(tgt.fd)
    return time.monotonic() - started


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_reference(fmt: str, src: Path, target: Path, *, verify: bool = False) -> float:
    """The reference tool's time; with ``verify``, the time until both the
    tool and a sha256 of the published file (``openssl dgst -sha256``, run
    beside it, as an operator checking the download would) are done: ours
    always hashes."""
    target.unlink(missing_ok=True)
    started = time.monotonic()
    # openssl rather than coreutils' sha256sum: 4-5x faster here (SHA
    # extensions), as fast as the agent's hashlib
    checksum = subprocess.Popen(["openssl", "dgst", "-sha256", str(src)],
                                stdout=subprocess.DEVNULL) if verify else None
    try:
        _reference_write(fmt, src, target)
    finally:
        if checksum is not None:
            checksum.wait(timeout=RUN_TIMEOUT)
    return time.monotonic() - started


def _reference_write(fmt: str, src: Path, target: Path) -> None:
    dd = ["dd", f"of={target}", "bs=4M", "conv=sparse,fsync", "status=none"]
    if fmt == "raw":
        subprocess.run([*dd, f"if={src}"], check=True, timeout=RUN_TIMEOUT)
    elif fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(src),
                        str(target)], check=True, timeout=RUN_TIMEOUT)
        _fsync(target)
    else:
        zstd = subprocess.Popen(["zstd", "-q", "-dc", str(src)], stdout=subprocess.PIPE)
        try:
            subprocess.run(dd, stdin=zstd.stdout, check=True, timeout=RUN_TIMEOUT)
        finally:
            if zstd.stdout is not None:
                zstd.stdout.close()
            zstd.wait(timeout=RUN_TIMEOUT)


def same_disk(a: Path, b: Path, size: int) -> bool:
    """Whether two written disks hold the same first ``size`` bytes."""
    with a.open("rb") as fa, b.open("rb") as fb:
        while size > 0:
            n = min(4 * MIB, size)
            if fa.read(n).ljust(n, b"\0") != fb.read(n).ljust(n, b"\0"):
                return False
            size -= n
    return True


def bench(images: dict[str, Path], repeat: int, workdir: Path) -> list[dict[str, Any]]:
    disk = images["raw"].stat().st_size
    rows = []
    for fmt in FORMATS:
        src = images[fmt]
        digest = sha256_of(src)          # also warms the page cache for both
        ours_t: list[float] = []
        ref_t: list[float] = []
        verified_t: list[float] = []
        for i in range(repeat):
            order = (("ours", "ref", "verified") if i % 2 == 0
                     else ("verified", "ref", "ours"))
            for who in order:
                if who == "ours":
                    ours_t.append(run_ours(fmt, src, digest, workdir / "ours.disk"))
                elif who == "ref":
                    ref_t.append(run_reference(fmt, src, workdir / "ref.disk"))
                else:
                    verified_t.append(run_reference(fmt, src, workdir / "ref.disk",
                                                    verify=True))
        if not same_disk(workdir / "ours.disk", workdir / "ref.disk", disk):
            raise SystemExit(f"image_write_bench: {fmt}: ours and the reference wrote "
                             "different disks")
        ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
        verified_s = statistics.median(verified_t)
        rows.append({"format": fmt, "published_bytes": src.stat().st_size, "disk_bytes": disk,
                     "ours_seconds": ours_s, "reference_seconds": ref_s,
                     "verified_reference_seconds": verified_s,
                     "ours_mib_s": disk / MIB / ours_s, "reference_mib_s": disk / MIB / ref_s,
                     "ratio": ref_s / ours_s, "verified_ratio": verified_s / ours_s,
                     "runs": {"ours": ours_t, "reference": ref_t, "verified": verified_t}})
    return rows


REFERENCE = {"raw": "dd", "qcow2": "qemu-img convert", "raw.zst": "zstd -dc | dd"}


def print_table(rows: list[dict[str, Any]], source: str) -> None:
    print(f"image write throughput ({source}), disk MiB/s; ratio = ours / reference "
          "throughput (> 1: ours faster); ours always checks the sha256, the reference "
          "does not, '+sha256' runs openssl dgst -sha256 of the published file beside it")
    print(f"{'format':<9} {'published MiB':>13} {'ours s':>8} {'ours MiB/s':>10} "
          f"{'reference':<17} {'ref s':>8} {'ref MiB/s':>9} {'ratio':>6} "
          f"{'+sha256 s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['format']:<9} {r['published_bytes'] / MIB:>13.0f} {r['ours_seconds']:>8.2f} "
              f"{r['ours_mib_s']:>10.0f} {REFERENCE[r['format']]:<17} "
              f"{r['reference_seconds']:>8.2f} {r['reference_mib_s']:>9.0f} {r['ratio']:>6.2f} "
              f"{r['verified_reference_seconds']:>9.2f} {r['verified_ratio']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.image_write_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a generated 48 MiB image, one run each (seconds)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side (median)")
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="size of the generated image when the Debian one is not built")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    for tool in ("qemu-img", "zstd", "dd", "sfdisk", "openssl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} missing: run 'scripts/setup.sh system'")
    repeat = 1 if args.quick else max(1, min(args.repeat, 9))
    with tempfile.TemporaryDirectory(prefix="lpmos-imgbench-", dir="/var/tmp") as tmpname:
        tmp = Path(tmpname)
        built = None if args.quick else built_images()
        if built:
            images, source = built, f"the Debian 12 image, {NAME}"
        else:
            size = 48 if args.quick else max(64, min(args.size_mib, 8192))
            images, source = make_images(tmp, size), f"a generated {size} MiB cloud-like disk"
        rows = bench(images, repeat, tmp)
    print_table(rows, source)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"source": source, "repeat": repeat, "rows": rows},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
