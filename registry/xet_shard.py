"""The Xet shard binary format (MDB shard v2, as in huggingface/xet-core `metadata_shard`).

Layout: header (32-byte tag, u64 version 2, u64 footer size), file info section, CAS (xorb) info
section, then optionally lookup tables and the 200-byte footer. Every record is 48 bytes.

* File info: per file a header (file hash, u32 flags, u32 entry count, u64 unused), its segments
  (xorb hash, u32 xorb flags, u32 unpacked bytes, u32 chunk start, u32 chunk end, end exclusive),
  one verification entry per segment when flag bit 31 is set (range hash + 16 unused bytes), one
  metadata extension when bit 30 is set (the file's SHA-256 + 16 unused bytes). A header whose hash
  is all 0xff bytes (the bookend) ends the section.
* CAS info: per xorb a header (xorb hash, u32 flags, u32 chunk count, u32 bytes in xorb, u32 bytes on
  disk), then per chunk (chunk hash, u32 unpacked start offset, u32 unpacked size, u32 flags with bit
  31 = global dedupe, u32 unused); a bookend header ends it.

Shards that clients upload stop after the CAS section or carry lookup tables and a footer; only the
two sections are read. Shards this server writes (dedupe answers) end with a footer and no lookup
tables, which clients read by scanning the CAS section.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from .xet_format import BOOKEND, ZERO_HASH, XetError, hash_to_hex

HEADER_TAG = b"HFRepoMetaData\x00" + bytes(
    [85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
)
HEADER_VERSION = 2
FOOTER_VERSION = 1
FOOTER_SIZE = 200
FLAG_VERIFICATION = 1 << 31
FLAG_METADATA_EXT = 1 << 30
CHUNK_FLAG_GLOBAL_DEDUPE = 1 << 31
MAX_SHARD_BYTES = 64 * 1024 * 1024
_REC = struct.Struct("<32sIIII")  # hash + four u32: every 48-byte record but the file header
_FILE_HEADER = struct.Struct("<32sIIQ")


@dataclass(frozen=True)
class Segment:
    """A file segment: chunks `[start, end)` of a xorb, `size` uncompressed bytes."""

    xorb: bytes
    size: int
    start: int
    end: int


@dataclass(frozen=True)
class ShardFile:
    """A file in a shard's file info section."""

    file_hash: bytes
    segments: tuple[Segment, ...]
    verification: tuple[bytes, ...] | None
    sha256: bytes | None

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass(frozen=True)
class ShardChunk:
    """A chunk in a shard's CAS info section."""

    hash: bytes
    offset: int
    size: int
    flags: int = 0


@dataclass(frozen=True)
class ShardXorb:
    """A xorb in a shard's CAS info section."""

    hash: bytes
    chunks: tuple[ShardChunk, ...]
    bytes_on_disk: int = 0
    flags: int = 0


@dataclass(frozen=True)
class Shard:
    """A parsed shard: files, xorbs and the footer's chunk hash key (zeros when the hashes are plain)."""

    files: tuple[ShardFile, ...]
    xorbs: tuple[ShardXorb, ...]
    hmac_key: bytes = ZERO_HASH


def _bad(why: str) -> XetError:
    return XetError(
        "ShardInvalid", f"Invalid shard: {why}. Re-upload it with hf_xet (nothing was registered)."
    )


class _Reader:
    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.view):
            raise _bad(f"truncated in the {what} at byte {self.pos}")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out


def _read_file(r: _Reader, file_hash: bytes, flags: int, n: int) -> ShardFile:
    segments = []
    for _ in range(n):
        xorb, _flags, size, start, end = _REC.unpack(r.take(48, "file segments"))
        if end <= start:
            raise _bad(f"file {hash_to_hex(file_hash)} has an empty chunk range [{start}, {end})")
        segments.append(Segment(xorb, size, start, end))
    verification = None
    if flags & FLAG_VERIFICATION:
        verification = tuple(bytes(r.take(48, "verification entries")[:32]) for _ in range(n))
    sha = bytes(r.take(48, "metadata extension")[:32]) if flags & FLAG_METADATA_EXT else None
    return ShardFile(file_hash, tuple(segments), verification, sha)


def _read_xorb(r: _Reader, xorb: bytes, flags: int, n: int, on_disk: int) -> ShardXorb:
    if n > 8 * 1024:
        raise _bad(f"xorb {hash_to_hex(xorb)} lists {n} chunks (at most 8192)")
    chunks = []
    for _ in range(n):
        h, offset, size, cflags, _unused = _REC.unpack(r.take(48, "CAS chunk entries"))
        chunks.append(ShardChunk(h, offset, size, cflags))
    return ShardXorb(xorb, tuple(chunks), on_disk, flags)


def parse_shard(data: bytes) -> Shard:
    """Parse a shard (header, file info and CAS info sections, footer if present).

    Raises:
        XetError: `ShardInvalid` for a wrong tag or version, truncation, or an oversized shard.
    """
    if len(data) > MAX_SHARD_BYTES:
        raise _bad(f"it has {len(data)} bytes (at most {MAX_SHARD_BYTES})")
    r = _Reader(data)
    tag, version, footer_size = struct.unpack("<32sQQ", r.take(48, "header"))
    if tag != HEADER_TAG:
        raise _bad("wrong magic tag (not an MDB shard)")
    if version != HEADER_VERSION:
        raise _bad(f"header version {version} (only {HEADER_VERSION} is supported)")
    files = []
    while True:
        file_hash, flags, n, _ = _FILE_HEADER.unpack(r.take(48, "file info section"))
        if file_hash == BOOKEND:
            break
        files.append(_read_file(r, file_hash, flags, n))
    xorbs = []
    while True:
        xorb, flags, n, _in_xorb, on_disk = _REC.unpack(r.take(48, "CAS info section"))
        if xorb == BOOKEND:
            break
        xorbs.append(_read_xorb(r, xorb, flags, n, on_disk))
    key = ZERO_HASH
    if footer_size and len(data) - r.pos >= FOOTER_SIZE:
        footer = r.view[len(data) - FOOTER_SIZE :]
        if struct.unpack_from("<Q", footer)[0] != FOOTER_VERSION:
            raise _bad("footer version is not 1")
        key = bytes(footer[72:104])
    return Shard(tuple(files), tuple(xorbs), key)


def _file_bytes(f: ShardFile) -> bytes:
    flags = (FLAG_VERIFICATION if f.verification is not None else 0) | (FLAG_METADATA_EXT if f.sha256 else 0)
    out = [_FILE_HEADER.pack(f.file_hash, flags, len(f.segments), 0)]
    out += [_REC.pack(s.xorb, 0, s.size, s.start, s.end) for s in f.segments]
    out += [v + bytes(16) for v in f.verification or ()]
    if f.sha256:
        out.append(f.sha256 + bytes(16))
    return b"".join(out)


def build_shard(
    files: list[ShardFile], xorbs: list[ShardXorb], hmac_key: bytes = ZERO_HASH, expiry: int = 0
) -> bytes:
    """Serialize a shard with a footer and no lookup tables (chunk hashes are written as given)."""
    out = bytearray(struct.pack("<32sQQ", HEADER_TAG, HEADER_VERSION, FOOTER_SIZE))
    file_start = len(out)
    for f in files:
        out += _file_bytes(f)
    out += _FILE_HEADER.pack(BOOKEND, 0, 0, 0)
    xorb_start = len(out)
    stored = on_disk = 0
    for x in xorbs:
        size = sum(c.size for c in x.chunks)
        stored, on_disk = stored + size, on_disk + x.bytes_on_disk
        out += _REC.pack(x.hash, x.flags, len(x.chunks), size, x.bytes_on_disk)
        out += b"".join(_REC.pack(c.hash, c.offset, c.size, c.flags, 0) for c in x.chunks)
    out += _REC.pack(BOOKEND, 0, 0, 0, 0)
    end = len(out)
    materialized = sum(f.size for f in files)
    out += struct.pack("<9Q", FOOTER_VERSION, file_start, xorb_start, end, 0, end, 0, end, 0)
    out += hmac_key + struct.pack("<QQ", int(time.time()), expiry) + bytes(48)
    out += struct.pack("<QQQQ", on_disk, materialized, stored, end)
    return bytes(out)
