"""Disk image formats, decoded as a stream: raw, compressed raw (zstd, xz,
gzip) and qcow2 (versions 2 and 3).

A decoder is fed the published bytes in order (:meth:`Decoder.feed`) and
writes the virtual disk through a :class:`Sink` (``write(offset, data)``,
``zero(offset, length)``); :meth:`Decoder.finish` says whether the stream
was complete.  Decoders touch no file, socket or clock: a decoder is its
state, so a download that breaks goes on feeding the same decoder from
where it stopped, and a download that restarts from byte 0 takes a new one.
Every error is an :class:`ImageFormatError` naming the reason.

qcow2 is decoded without seeking: the header is parsed when the first
cluster has arrived, the L1 table when the stream reaches it, each L2
table when the stream reaches it, and each data cluster is written to its
guest offset as it passes.  ``qemu-img convert -O qcow2`` places every
table before the data it maps, so nothing waits; bytes that arrive before
the table that maps them are kept, up to :data:`QCOW2_BUFFER_MAX`, until the
last table has been seen (then unmapped bytes are dropped: refcount blocks,
snapshot tables, padding).  Beyond the bound the decoder refuses the image
("qcow2 layout not streamable").  Strict on purpose: backing files,
encryption, external data files, extended L2 entries, compression other
than zlib, unknown incompatible features and sizes that do not add up are
refused, because a wrong guess here writes a wrong disk.

Output pieces are bounded (:data:`OUT_MAX` for the decompressors, one
cluster for qcow2), so a 1 MiB chunk of a highly compressed image never
becomes gigabytes in memory.
"""

from __future__ import annotations

import bisect
import heapq
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from lpmos.catalog import DISK_FORMATS

FORMATS = DISK_FORMATS                # the catalog's names (lpmos.catalog infers them)
OUT_MAX = 4 * 1024 * 1024
QCOW2_BUFFER_MAX = 64 * 1024 * 1024
QCOW2_PENDING_MAX = 1 << 21           # mapped clusters not yet received (memory bound)
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_L1_MAX = 32 * 1024 * 1024 // 8  # qemu's QCOW_MAX_L1_SIZE, in entries
VIRTUAL_MAX = 1 << 56
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00   # bits 9-55: host offset in L1 and L2 entries
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                  | INCOMPAT_EXTL2)
EXT_END = 0
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


class ImageFormatError(ValueError):
    """The image cannot be decoded; ``str()`` says why."""


class Sink(Protocol):
    """Where a decoder writes the virtual disk.  ``write`` and ``zero`` stay
    inside the virtual size announced first; ``data`` is only valid during
    the call (a sink that keeps it copies it)."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...


SizeCheck = Callable[[int], None]


class Decoder(Protocol):
    def feed(self, data: bytes) -> None:
        """Decode the next published bytes."""
        ...

    def finish(self) -> int:
        """The stream ended: the virtual disk's size, or
        :class:`ImageFormatError` when the stream was incomplete."""
        ...


# --- raw and compressed raw -------------------------------------------------------


class RawDecoder:
    """Raw bytes, written in order from offset 0.  ``expected`` (when known)
    is the disk's size: more is refused at once, less at :meth:`finish`."""

    def __init__(self, sink: Sink, *, expected: int | None = None) -> None:
        self.sink = sink
        self.expected = expected
        self.offset = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self.expected is not None and self.offset + len(data) > self.expected:
            raise ImageFormatError(f"the image holds more than the {self.expected} bytes "
                                   f"announced for its disk")
        self.sink.write(self.offset, data)
        self.offset += len(data)

    def finish(self) -> int:
        if self.expected is not None and self.offset != self.expected:
            raise ImageFormatError(f"the image holds {self.offset} bytes, "
                                   f"{self.expected} were announced for its disk")
        return self.offset


class _RawOut:
    """The file-like object zstandard's stream writer writes into."""

    def __init__(self, raw: RawDecoder) -> None:
        self.raw = raw

    def write(self, data: bytes) -> int:
        self.raw.feed(data)
        return len(data)


class ZstdDecoder:
    """zstd (one or more frames).  The first frame's content size, when the
    header carries it, is the disk's size for the check before writing
    (``disk_size`` from the catalog wins)."""

    HEADER_MAX = 18

    def __init__(self, sink: Sink, *, disk_size: int | None, on_size: SizeCheck) -> None:
        self.sink = sink
        self.disk_size = disk_size
        self.on_size = on_size
        self.head = b""
        self.raw: RawDecoder | None = None
        self.writer: zstandard.ZstdDecompressionWriter | None = None

    def _start(self, head: bytes) -> None:
        size = self.disk_size
        if size is None:
            try:
                content = zstandard.frame_content_size(head)
            except zstandard.ZstdError as exc:
                raise ImageFormatError(f"not a zstd stream: {exc}") from None
            size = content if content >= 0 else None
        if size is not None:
            self.on_size(size)
        self.raw = RawDecoder(self.sink, expected=self.disk_size)
        out: Any = _RawOut(self.raw)     # zstandard wants a file; write() is all it calls
        self.writer = zstandard.ZstdDecompressor().stream_writer(
            out, write_size=OUT_MAX, write_return_read=True)

    def feed(self, data: bytes) -> None:
        if self.writer is None:
            self.head += data
            if len(self.head) < self.HEADER_MAX:
                return
            data, self.head = self.head, b""
            self._start(data)
        assert self.writer is not None
        try:
            self.writer.write(data)
        except zstandard.ZstdError as exc:
            raise ImageFormatError(f"zstd: {exc}") from None

    def finish(self) -> int:
        if self.writer is None:
            if not self.head:
                raise ImageFormatError("the zstd stream is empty")
            data, self.head = self.head, b""
            self._start(data)
            self.feed(data)
        assert self.writer is not None and self.raw is not None
        try:
            self.writer.flush()  # type: ignore[no-untyped-call]
        except zstandard.ZstdError as exc:
            raise ImageFormatError(f"zstd: {exc}") from None
        return self.raw.finish()


class _StdlibDecoder:
    """xz or gzip through the standard library's bounded decompressors;
    concatenated streams (members) are decoded one after the other."""

    name = ""

    def __init__(self, sink: Sink, *, disk_size: int | None, on_size: SizeCheck) -> None:
        if disk_size is not None:
            on_size(disk_size)
        self.raw = RawDecoder(sink, expected=disk_size)
        self.dec = self._new()
        self.fed = False

    def _new(self) -> lzma.LZMADecompressor | zlib._Decompress:
        raise NotImplementedError

    def _decompress(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _rest(self) -> bytes:
        raise NotImplementedError

    def _need_input(self) -> bool:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        try:
            while True:
                if self.dec.eof:
                    data = self._rest() + data
                    if not data.strip(b"\x00"):
                        return             # stream padding
                    self.dec = self._new()
                if data:
                    self.fed = True
                out = self._decompress(data)
                data = b""
                self.raw.feed(out)
                if self._need_input() and not self.dec.eof:
                    return
        except (lzma.LZMAError, zlib.error, EOFError) as exc:
            raise ImageFormatError(f"{self.name}: {exc}") from None

    def finish(self) -> int:
        if not self.fed:
            raise ImageFormatError(f"the {self.name} stream is empty")
        if not self.dec.eof:
            raise ImageFormatError(f"the {self.name} stream ends before its end marker "
                                   f"(truncated image)")
        return self.raw.finish()


class XzDecoder(_StdlibDecoder):
    name = "xz"
    dec: lzma.LZMADecompressor

    def _new(self) -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def _decompress(self, data: bytes) -> bytes:
        return self.dec.decompress(data, max_length=OUT_MAX)

    def _rest(self) -> bytes:
        return self.dec.unused_data

    def _need_input(self) -> bool:
        return self.dec.needs_input


class GzipDecoder(_StdlibDecoder):
    name = "gzip"
    dec: zlib._Decompress

    def _new(self) -> zlib._Decompress:
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def _decompress(self, data: bytes) -> bytes:
        self.last = self.dec.decompress(self.dec.unconsumed_tail + data, OUT_MAX)
        return self.last

    def _rest(self) -> bytes:
        return self.dec.unused_data

    def _need_input(self) -> bool:
        return not self.dec.unconsumed_tail and len(self.last) < OUT_MAX


# --- qcow2 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int                 # virtual disk, bytes
    l1_size: int              # entries
    l1_offset: int
    header_length: int
    incompatible: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def l2_coverage(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.cluster_size * self.l2_entries


def qcow2_header_needed(prefix: bytes, file_size: int) -> int:
    """How many leading bytes :func:`parse_qcow2_header` needs: the whole
    first cluster (header and extensions live there), once ``prefix`` says
    how large a cluster is."""
    if len(prefix) < 24:
        return min(24, file_size)
    if prefix[:4] != QCOW2_MAGIC:
        return len(prefix)            # parse_qcow2_header says why
    cluster_bits: int = struct.unpack_from(">I", prefix, 20)[0]
    if not 9 <= cluster_bits <= 21:
        return min(104, file_size)    # enough for parse_qcow2_header to say why
    return min(1 << cluster_bits, file_size)


def parse_qcow2_header(data: bytes, file_size: int) -> Qcow2Header:
    """The header in the first cluster of a qcow2 file of ``file_size``
    bytes, validated (see the module's docstring for what is refused)."""
    if data[:4] != QCOW2_MAGIC[:len(data)] or not data:
        raise ImageFormatError("not a qcow2 image (no QFI\\xfb magic)")
    if len(data) < 72:
        raise ImageFormatError(f"qcow2 header truncated ({len(data)} bytes)")
    (version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_offset,
     refcount_off, refcount_clusters, _nb_snapshots, _snapshots_off) = struct.unpack_from(
        ">IQIIQIIQQIIQ", data, 4)
    if version not in (2, 3):
        raise ImageFormatError(f"qcow2 version {version} is not supported (2 and 3 are)")
    if not 9 <= cluster_bits <= 21:
        raise ImageFormatError(f"qcow2 cluster_bits {cluster_bits} out of range 9..21")
    cluster = 1 << cluster_bits
    if len(data) < min(cluster, file_size):
        raise ImageFormatError("qcow2 header: the first cluster is incomplete")
    incompatible, header_length, compression, refcount_order = 0, 72, 0, 4
    if version == 3:
        if len(data) < 104:
            raise ImageFormatError("qcow2 v3 header truncated")
        incompatible, _compat, _autoclear, refcount_order, header_length = struct.unpack_from(
            ">QQQII", data, 72)
        if not 104 <= header_length <= min(cluster, len(data)):
            raise ImageFormatError(f"qcow2 header_length {header_length} out of range")
        if header_length > 104:
            compression = data[104]
    if backing_off:
        name = data[backing_off:backing_off + min(backing_len, 1023)] \
            if backing_off + backing_len <= len(data) else b""
        shown = name.decode("utf-8", errors="replace") or "?"
        raise ImageFormatError(f"the qcow2 image has a backing file ({shown!r}); "
                               f"flatten it first: qemu-img convert -O qcow2 IN OUT")
    if crypt:
        raise ImageFormatError(f"the qcow2 image is encrypted (method {crypt}); not supported")
    _check_incompatible(incompatible, compression)
    if refcount_order > 6:
        raise ImageFormatError(f"qcow2 refcount_order {refcount_order} out of range 0..6")
    if size > VIRTUAL_MAX:
        raise ImageFormatError(f"qcow2 virtual size {size} is out of range")
    header = Qcow2Header(version, cluster_bits, size, l1_size, l1_offset, header_length,
                         incompatible)
    _check_layout(header, file_size, refcount_off, refcount_clusters)
    _check_extensions(data[:cluster], header_length)
    return header


def _check_incompatible(incompatible: int, compression: int) -> None:
    reasons = []
    if incompatible & INCOMPAT_CORRUPT:
        reasons.append("it is marked corrupt (qemu-img check -r all)")
    if incompatible & INCOMPAT_DATA_FILE:
        reasons.append("its data is in an external data file")
    if incompatible & INCOMPAT_EXTL2:
        reasons.append("it uses extended L2 entries (subclusters)")
    if incompatible & ~INCOMPAT_KNOWN:
        reasons.append(f"unknown incompatible features {incompatible & ~INCOMPAT_KNOWN:#x}")
    if compression and not incompatible & INCOMPAT_COMPRESSION:
        reasons.append("a compression type without its feature bit")
    elif compression:
        reasons.append(f"compression type {compression} (zstd) is not supported, only zlib: "
                       f"qemu-img convert -c -o compression_type=zlib")
    if reasons:
        raise ImageFormatError("qcow2 image refused: " + "; ".join(reasons))


def _check_layout(h: Qcow2Header, file_size: int, refcount_off: int,
                  refcount_clusters: int) -> None:
    """The tables must lie inside the file, aligned, and the L1 table must
    cover the virtual size."""
    needed = -(-h.size // h.l2_coverage)
    if h.l1_size < needed:
        raise ImageFormatError(f"qcow2 L1 table has {h.l1_size} entries; a disk of {h.size} "
                               f"bytes needs {needed}")
    if h.l1_size > QCOW2_L1_MAX:
        raise ImageFormatError(f"qcow2 L1 table of {h.l1_size} entries is too large")
    if h.l1_size:
        if h.l1_offset % h.cluster_size or h.l1_offset < h.cluster_size:
            raise ImageFormatError(f"qcow2 L1 table offset {h.l1_offset} is not a cluster "
                                   f"after the header")
        if h.l1_offset + 8 * h.l1_size > file_size:
            raise ImageFormatError(f"qcow2 L1 table at byte {h.l1_offset} ends beyond the "
                                   f"file ({file_size} bytes)")
    if refcount_off % h.cluster_size or refcount_off + refcount_clusters * h.cluster_size \
            > max(file_size, h.cluster_size) or (refcount_off == 0 and refcount_clusters):
        raise ImageFormatError(f"qcow2 refcount table at byte {refcount_off} "
                               f"({refcount_clusters} clusters) is not inside the file")


def _check_extensions(cluster: bytes, at: int) -> None:
    for _ in range(len(cluster) // 8 + 1):
        if at + 8 > len(cluster):
            raise ImageFormatError("qcow2 header extensions overrun the first cluster")
        kind, length = struct.unpack_from(">II", cluster, at)
        if kind == EXT_END:
            return
        if kind == EXT_DATA_FILE:
            raise ImageFormatError("qcow2 image refused: its data is in an external file")
        if kind == EXT_CRYPTO:
            raise ImageFormatError("qcow2 image refused: it is encrypted")
        at += 8 + (length + 7) // 8 * 8
    raise ImageFormatError("qcow2 header extensions do not end")


# Region kinds, in the order a stream meets them.
L1, L2, DATA, ZDATA = 0, 1, 2, 3
_KIND_NAME = {L1: "L1 table", L2: "L2 table", DATA: "data cluster",
              ZDATA: "compressed cluster"}


class _Region:
    """Host bytes [start, end) the decoder waits for, and what they are."""

    __slots__ = ("buf", "end", "guest", "kind", "start")

    def __init__(self, start: int, end: int, kind: int, guest: int) -> None:
        self.start, self.end, self.kind, self.guest = start, end, kind, guest
        self.buf: bytearray | None = None

    def __lt__(self, other: _Region) -> bool:
        return (self.start, self.kind) < (other.start, other.kind)


class Qcow2Decoder:
    """qcow2 as a stream (see the module's docstring).  ``file_size`` is the
    published file's size: every table and cluster must lie inside it."""

    def __init__(self, sink: Sink, *, file_size: int, on_size: SizeCheck,
                 buffer_max: int = QCOW2_BUFFER_MAX, pending_max: int = QCOW2_PENDING_MAX) -> None:
        self.sink = sink
        self.file_size = file_size
        self.on_size = on_size
        self.buffer_max = buffer_max
        self.pending_max = pending_max
        self.head = bytearray()
        self.header: Qcow2Header | None = None
        self.pos = 0                   # host offset of the next byte fed
        self.heap: list[_Region] = []
        self.active: list[_Region] = []
        self.tables_left = 1           # the L1 table, then each L2 table it names
        self.kept: list[tuple[int, bytes]] = []     # unmapped bytes (while tables_left)
        self.kept_starts: list[int] = []
        self.kept_bytes = 0
        self.recent: list[tuple[int, bytes]] = []   # compressed clusters just decoded

    # -- feeding
    def feed(self, data: bytes) -> None:
        if self.header is None:
            self.head += data
            need = qcow2_header_needed(bytes(self.head[:24]), self.file_size)
            if len(self.head) < need:
                return
            self._start_from_head(need)
            return
        self._process(memoryview(data))

    def _start_from_head(self, need: int) -> None:
        head = bytes(self.head)
        self.head = bytearray()
        h = parse_qcow2_header(head[:need], self.file_size)
        self.header = h
        self.on_size(h.size)
        self.pos = need
        if h.l1_size:
            self._push(_Region(h.l1_offset, h.l1_offset + 8 * h.l1_size, L1, 0))
        else:
            self._tables_done()
        if len(head) > need:
            self._process(memoryview(head)[need:])

    def _process(self, mv: memoryview) -> None:
        """Hand the bytes at ``self.pos`` to the regions waiting for them,
        boundary by boundary; a table completed here may name regions later
        in the same chunk, so ``self.pos`` advances with each step."""
        start = self.pos
        end = start + len(mv)
        cur = start
        while cur < end:
            while self.heap and self.heap[0].start <= cur:
                self.active.append(heapq.heappop(self.heap))
            nxt = end
            if self.heap:
                nxt = min(nxt, self.heap[0].start)
            for region in self.active:
                nxt = min(nxt, region.end)
            piece = mv[cur - start:nxt - start]
            if not self.active:
                self._keep(cur, piece)
            for region in self.active:
                if region.buf is None and region.start == cur and region.end == nxt:
                    continue               # the whole region is ``piece``: no copy
                if region.buf is None:
                    region.buf = bytearray()
                region.buf += piece
            cur = self.pos = nxt
            done = [r for r in self.active if r.end <= cur]
            if done:
                self.active = [r for r in self.active if r.end > cur]
                for region in done:
                    self._complete(region, piece if region.buf is None else region.buf)

    def _keep(self, at: int, piece: memoryview) -> None:
        """Keep bytes no known table maps (yet), while tables are still due."""
        if not self.tables_left:
            return
        self.kept_bytes += len(piece)
        if self.kept_bytes > self.buffer_max:
            raise ImageFormatError(
                f"qcow2 layout not streamable: more than {self.buffer_max >> 20} MiB arrived "
                f"before the tables that map them (at byte {at}); convert the image with "
                f"qemu-img convert -O qcow2")
        self.kept.append((at, bytes(piece)))
        self.kept_starts.append(at)

    def _kept_range(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) that passed already, or None when some were not
        kept.  They come from the unmapped bytes kept, the compressed clusters
        just decoded and the regions still collecting: qemu packs compressed
        clusters into a partly filled host cluster, so one may start inside
        the sector-rounded tail of the one before, ahead of its L2 table."""
        segments: list[tuple[int, bytes | bytearray]] = list(self.recent)
        segments += [(r.start, r.buf) for r in self.active if r.buf]
        i = max(bisect.bisect_right(self.kept_starts, start) - 1, 0)
        while i < len(self.kept) and self.kept[i][0] < end:
            segments.append(self.kept[i])
            i += 1
        out = bytearray()
        at = start
        while at < end:
            best: bytes | bytearray = b""
            for seg_start, seg in segments:
                if seg_start <= at < seg_start + len(seg):
                    take = seg[at - seg_start:end - seg_start]
                    if len(take) > len(best):
                        best = take
            if not best:
                return None
            out += best
            at += len(best)
        return bytes(out)

    def _push(self, region: _Region) -> None:
        """Wait for ``region``, or take it from the kept bytes if it passed."""
        if len(self.heap) + len(self.active) >= self.pending_max:
            raise ImageFormatError(f"qcow2 layout not streamable: more than "
                                   f"{self.pending_max} clusters mapped ahead of their data")
        if region.start >= self.pos:
            heapq.heappush(self.heap, region)
            return
        got = self._kept_range(region.start, min(region.end, self.pos))
        if got is None:
            raise ImageFormatError(
                f"qcow2 layout not streamable: the {_KIND_NAME[region.kind]} at byte "
                f"{region.start} is named by a table that comes after it; convert the image "
                f"with qemu-img convert -O qcow2")
        if region.end <= self.pos:
            self._complete(region, got)
        else:
            region.buf = bytearray(got)
            self.active.append(region)

    def _tables_done(self) -> None:
        self.tables_left = 0
        self.kept, self.kept_starts, self.kept_bytes = [], [], 0
        self.recent = []

    # -- what the bytes are
    def _complete(self, region: _Region, data: bytes | bytearray | memoryview) -> None:
        if region.kind == DATA:
            self.sink.write(region.guest, data)
        elif region.kind == ZDATA:
            self._inflate(region, data)
            if self.tables_left:
                horizon = self.pos - 2 * self.header.cluster_size if self.header else 0
                self.recent = [(s, b) for s, b in self.recent if s + len(b) > horizon]
                self.recent.append((region.start, bytes(data)))
        elif region.kind == L2:
            self._l2(region, bytes(data))
        else:
            self._l1(bytes(data))

    def _table_done(self) -> None:
        self.tables_left -= 1
        if not self.tables_left:
            self._tables_done()

    def _l1(self, data: bytes) -> None:
        h = self.header
        assert h is not None
        entries = struct.unpack(f">{h.l1_size}Q", data)
        tables = []
        for i, entry in enumerate(entries):
            guest = i * h.l2_coverage
            if entry & ~(OFFSET_MASK | COPIED):
                raise ImageFormatError(f"qcow2 L1 entry {i} has reserved bits set "
                                       f"({entry:#018x})")
            if guest >= h.size:
                continue
            host = entry & OFFSET_MASK
            if not host:
                self.sink.zero(guest, min(h.l2_coverage, h.size - guest))
                continue
            if host % h.cluster_size or host < h.cluster_size \
                    or host + h.cluster_size > self.file_size:
                raise ImageFormatError(f"qcow2 L1 entry {i}: L2 table offset {host} is not "
                                       f"a cluster inside the file")
            tables.append(_Region(host, host + h.cluster_size, L2, guest))
        self.tables_left += len(tables)
        self._table_done()
        for region in tables:
            self._push(region)

    def _l2(self, region: _Region, data: bytes) -> None:
        h = self.header
        assert h is not None
        entries = struct.unpack(f">{h.l2_entries}Q", data)
        csize = h.cluster_size
        x = 62 - (h.cluster_bits - 8)
        zero_from = zero_to = -1
        for j, entry in enumerate(entries):
            guest = region.guest + j * csize
            if guest >= h.size:
                break
            length = min(csize, h.size - guest)
            if entry & COMPRESSED:
                host = entry & ((1 << x) - 1)
                sectors = ((entry >> x) & ((1 << (h.cluster_bits - 8)) - 1)) + 1
                end = min(host - host % 512 + sectors * 512, self.file_size)
                if host < csize or host >= end:
                    raise ImageFormatError(f"qcow2 L2 table at byte {region.start}, entry "
                                           f"{j}: compressed cluster at {host} outside the file")
                new = _Region(host, end, ZDATA, guest)
            else:
                if entry & ~(OFFSET_MASK | COPIED | ZERO_FLAG) or \
                        (entry & ZERO_FLAG and h.version == 2):
                    raise ImageFormatError(f"qcow2 L2 table at byte {region.start}, entry {j} "
                                           f"has reserved bits set ({entry:#018x})")
                host = entry & OFFSET_MASK
                if entry & ZERO_FLAG or not host:
                    if zero_to != guest:
                        if zero_to > zero_from >= 0:
                            self.sink.zero(zero_from, zero_to - zero_from)
                        zero_from = guest
                    zero_to = guest + length
                    continue
                if host % csize or host + length > self.file_size:
                    raise ImageFormatError(f"qcow2 L2 table at byte {region.start}, entry "
                                           f"{j}: data cluster at {host} is not a cluster "
                                           f"inside the file")
                new = _Region(host, host + length, DATA, guest)
            self._push(new)
        if zero_to > zero_from >= 0:
            self.sink.zero(zero_from, zero_to - zero_from)
        self._table_done()

    def _inflate(self, region: _Region, data: bytes | bytearray | memoryview) -> None:
        h = self.header
        assert h is not None
        try:
            out = zlib.decompressobj(-12).decompress(data, h.cluster_size)
        except zlib.error as exc:
            raise ImageFormatError(f"qcow2 compressed cluster at byte {region.start}: "
                                   f"{exc}") from None
        if len(out) < h.cluster_size:
            raise ImageFormatError(f"qcow2 compressed cluster at byte {region.start} "
                                   f"decompresses to {len(out)} bytes, not a cluster")
        self.sink.write(region.guest, memoryview(out)[:min(h.cluster_size, h.size - region.guest)])

    def finish(self) -> int:
        if self.header is None:
            if self.head:
                self._start_from_head(len(self.head))
            else:
                raise ImageFormatError("the qcow2 image is empty")
        h = self.header
        assert h is not None
        waiting = self.active + self.heap
        if waiting:
            first = min(waiting)
            raise ImageFormatError(
                f"the qcow2 image is truncated: the {_KIND_NAME[first.kind]} at byte "
                f"{first.start} lies beyond the {self.pos} bytes received")
        return h.size


def open_decoder(fmt: str, sink: Sink, *, file_size: int, disk_size: int | None,
                 on_size: SizeCheck) -> Decoder:
    """A new decoder of ``fmt`` (one of :data:`FORMATS`) for a published file
    of ``file_size`` bytes.  ``on_size`` is called with the virtual disk's
    size before the first write when the format tells it up front (raw: the
    file; qcow2: the header; compressed raw: ``disk_size`` or the zstd
    frame's content size); it may raise to refuse the image."""
    if fmt == "raw":
        if disk_size is not None and disk_size != file_size:
            raise ImageFormatError(f"a raw image of {file_size} bytes cannot hold a disk of "
                                   f"{disk_size} bytes")
        on_size(file_size)
        return RawDecoder(sink, expected=file_size)
    if fmt == "qcow2":
        return Qcow2Decoder(sink, file_size=file_size, on_size=on_size)
    if fmt == "raw.zst":
        return ZstdDecoder(sink, disk_size=disk_size, on_size=on_size)
    if fmt == "raw.xz":
        return XzDecoder(sink, disk_size=disk_size, on_size=on_size)
    if fmt == "raw.gz":
        return GzipDecoder(sink, disk_size=disk_size, on_size=on_size)
    raise ImageFormatError(f"unknown image format {fmt!r}; known: {', '.join(FORMATS)}")
