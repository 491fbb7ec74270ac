"""Xet hashing and the xorb binary format (Xet protocol specification 1.1, as in huggingface/xet-core).

Hashes are 32 bytes. Their string form (`hash_to_hex`) prints each of the four 8-byte words as a
little-endian u64 in 16 hex digits, so the bytes of each word appear reversed.

* chunk hash: blake3 keyed with `DATA_KEY` over the chunk bytes;
* xorb hash: the aggregated (merkle) hash of `(chunk hash, size)` pairs, nodes hashed with
  `INTERNAL_NODE_KEY` over lines `"<hex> : <size>\\n"`, cut after a hash whose last word is 0 mod 4
  (2 to 9 children per node);
* file hash: the aggregated hash of all the file's chunks, then blake3 keyed with a 32-byte salt
  (zeros) over it; the empty file hashes to 32 zero bytes;
* verification range hash: blake3 keyed with `VERIFICATION_KEY` over the concatenated chunk hashes.

A xorb is a series of chunks, each an 8-byte header (version 0, compressed length u24 LE, scheme,
uncompressed length u24 LE) then the compressed bytes (schemes 0 None, 1 LZ4 frame, 2 byte-grouping-4
then LZ4 frame), optionally followed by the `XETBLOB` footer (CasObjectInfo v0 or v1) and its u32 length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import lz4.frame

DATA_KEY = bytes(
    [102, 151, 245, 119, 91, 149, 80, 222, 49, 53, 203, 172, 165, 151, 24, 28]
    + [157, 228, 33, 16, 155, 235, 43, 88, 180, 208, 176, 75, 147, 173, 242, 41]
)
INTERNAL_NODE_KEY = bytes(
    [1, 126, 197, 199, 165, 71, 41, 150, 253, 148, 102, 102, 180, 138, 2, 230]
    + [93, 221, 83, 111, 55, 199, 109, 210, 248, 99, 82, 230, 74, 83, 113, 63]
)
VERIFICATION_KEY = bytes(
    [127, 24, 87, 214, 206, 86, 237, 102, 18, 127, 249, 19, 231, 165, 195, 243]
    + [164, 205, 38, 213, 181, 219, 73, 230, 65, 36, 152, 127, 40, 251, 148, 195]
)
ZERO_HASH = bytes(32)
BOOKEND = b"\xff" * 32
MAX_CHUNK_SIZE = 128 * 1024
MAX_XORB_BYTES = 64 * 1024 * 1024
MAX_XORB_CHUNKS = 8 * 1024
MAX_XORB_SERIALIZED = 2 * MAX_XORB_BYTES
"""Largest xorb body accepted: 64 MiB of chunks stored uncompressed plus headers and footer fit well within."""
GLOBAL_DEDUPE_MODULUS = 1024
SCHEME_NONE, SCHEME_LZ4, SCHEME_BG4_LZ4 = 0, 1, 2
XORB_IDENT = b"XETBLOB"
_HEX = frozenset("0123456789abcdef")


class XetError(ValueError):
    """A refused Xet object or request. `code` is machine-readable (for `X-Error-Code`); the message
    says what is wrong and what to do.

    Codes: `InvalidHash`, `XorbInvalid`, `XorbHashMismatch`, `XorbMissing`, `ShardInvalid`,
    `FileHashMismatch`, `FileNotFound`, `RangeNotSatisfiable`.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def hash_to_hex(raw: bytes) -> str:
    """The Xet string form of a 32-byte hash (each 8-byte word printed as a little-endian u64)."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def hex_to_hash(text: str) -> bytes:
    """The 32 bytes of a hash string; inverse of `hash_to_hex`. Raises XetError `InvalidHash`."""
    check_hash(text)
    return b"".join(bytes.fromhex(text[i : i + 16])[::-1] for i in range(0, 64, 16))


def check_hash(text: str, what: str = "hash") -> str:
    """Validate a hash string (64 lowercase hex characters) before it names a file; return it."""
    if not isinstance(text, str) or len(text) != 64 or not set(text) <= _HEX:
        raise XetError(
            "InvalidHash",
            f"Invalid Xet {what} {str(text)[:80]!r}: expected 64 lowercase hex characters "
            "(the hash string hf_xet prints).",
        )
    return text


def chunk_hash(data: bytes | memoryview) -> bytes:
    """Hash of one chunk's uncompressed bytes."""
    return blake3.blake3(data, key=DATA_KEY).digest()


def _last_word(h: bytes) -> int:
    return int.from_bytes(h[24:32], "little")


def _merge(entries: list[tuple[bytes, int]]) -> tuple[bytes, int]:
    text = "".join(f"{hash_to_hex(h)} : {size}\n" for h, size in entries)
    node = blake3.blake3(text.encode(), key=INTERNAL_NODE_KEY).digest()
    return node, sum(size for _, size in entries)


def _next_cut(entries: list[tuple[bytes, int]], start: int) -> int:
    n = len(entries) - start
    if n <= 2:
        return start + n
    end = min(9, n)
    for i in range(2, end):
        if _last_word(entries[start + i][0]) % 4 == 0:
            return start + i + 1
    return start + end


def merkle_hash(chunks: list[tuple[bytes, int]]) -> bytes:
    """Aggregated hash of `(chunk hash, size)` pairs; the xorb hash. 32 zero bytes when empty."""
    if not chunks:
        return ZERO_HASH
    level = list(chunks)
    while len(level) > 1:
        merged, i = [], 0
        while i < len(level):
            cut = _next_cut(level, i)
            merged.append(_merge(level[i:cut]))
            i = cut
        level = merged
    return level[0][0]


def file_hash(chunks: list[tuple[bytes, int]], salt: bytes = ZERO_HASH) -> bytes:
    """Xet file hash of a file made of these `(chunk hash, size)` pairs."""
    if not chunks:
        return ZERO_HASH
    return blake3.blake3(merkle_hash(chunks), key=salt).digest()


def range_hash(hashes: list[bytes]) -> bytes:
    """Verification hash of a chunk range (shard verification entries)."""
    return blake3.blake3(b"".join(hashes), key=VERIFICATION_KEY).digest()


def keyed_hash(h: bytes, key: bytes) -> bytes:
    """A chunk hash as a keyed shard shows it (`chunk_hash_hmac_key` in the shard footer)."""
    return blake3.blake3(h, key=key).digest()


def is_global_dedupe_chunk(h: bytes) -> bool:
    """Whether the spec makes a chunk eligible for the global dedupe index by its hash alone."""
    return _last_word(h) % GLOBAL_DEDUPE_MODULUS == 0


@dataclass(frozen=True)
class XorbChunk:
    """One chunk of a xorb: its hash, byte range `[start, end)` in the xorb (header included) and size."""

    hash: bytes
    start: int
    end: int
    size: int


@dataclass(frozen=True)
class Xorb:
    """A parsed, verified xorb: its computed hash, its chunks, and whether it carried a footer."""

    hash: bytes
    chunks: tuple[XorbChunk, ...]
    has_footer: bool

    @property
    def size(self) -> int:
        """Uncompressed bytes."""
        return sum(c.size for c in self.chunks)


def _bg4_regroup(grouped: bytes) -> bytes:
    n = len(grouped)
    split, rem = divmod(n, 4)
    out = bytearray(n)
    offset = 0
    for k in range(4):
        size = split + (1 if rem > k else 0)
        out[k::4] = grouped[offset : offset + size]
        offset += size
    return bytes(out)


def _lz4(data: memoryview, expected: int) -> bytes:
    decoder = lz4.frame.LZ4FrameDecompressor()
    out = decoder.decompress(bytes(data), max_length=expected + 1)
    if not decoder.eof or decoder.unused_data:
        raise ValueError("the LZ4 frame does not end where the chunk header says")
    return out


def decompress_chunk(scheme: int, body: memoryview, size: int) -> bytes:
    """Uncompressed bytes of one chunk body. Raises ValueError on a bad scheme or bad data."""
    if scheme == SCHEME_NONE:
        out = bytes(body)
    elif scheme == SCHEME_LZ4:
        out = _lz4(body, size)
    elif scheme == SCHEME_BG4_LZ4:
        out = _bg4_regroup(_lz4(body, size))
    else:
        raise ValueError(f"unknown compression scheme {scheme}")
    if len(out) != size:
        raise ValueError(f"decompressed to {len(out)} bytes, the header says {size}")
    return out


def _bad_xorb(why: str) -> XetError:
    return XetError(
        "XorbInvalid", f"Invalid xorb: {why}. Re-upload it with hf_xet (the xorb was not stored)."
    )


def read_chunk(view: memoryview, pos: int) -> tuple[bytes, int]:
    """Decode the chunk whose header starts at `pos`; return its bytes and the end of its body."""
    if len(view) - pos < 8:
        raise _bad_xorb(f"truncated chunk header at byte {pos}")
    version, c0, c1, c2, scheme, u0, u1, u2 = view[pos : pos + 8]
    comp, size = c0 | c1 << 8 | c2 << 16, u0 | u1 << 8 | u2 << 16
    if version != 0:
        raise _bad_xorb(f"chunk header version {version} at byte {pos} (only 0 exists)")
    if comp > 2 * MAX_CHUNK_SIZE or size > MAX_CHUNK_SIZE:
        raise _bad_xorb(f"chunk at byte {pos} is larger than {MAX_CHUNK_SIZE} bytes")
    end = pos + 8 + comp
    if end > len(view):
        raise _bad_xorb(f"truncated chunk at byte {pos}: {comp} bytes announced, {len(view) - pos - 8} left")
    try:
        data = decompress_chunk(scheme, view[pos + 8 : end], size)
    except (ValueError, RuntimeError) as e:
        raise _bad_xorb(f"chunk at byte {pos} does not decompress ({e})") from None
    return data, end


def parse_xorb(data: bytes) -> Xorb:
    """Parse and verify every chunk of a xorb (and its footer, if any); compute the xorb hash.

    Raises:
        XetError: `XorbInvalid` for bad framing, compression, limits or a footer that disagrees.
    """
    if len(data) > MAX_XORB_SERIALIZED:
        raise _bad_xorb(f"it has {len(data)} bytes (at most {MAX_XORB_SERIALIZED})")
    view = memoryview(data)
    chunks: list[XorbChunk] = []
    pos = 0
    total = 0
    while pos < len(view) and bytes(view[pos : pos + 7]) != XORB_IDENT:
        body, end = read_chunk(view, pos)
        chunks.append(XorbChunk(chunk_hash(body), pos, end, len(body)))
        total += len(body)
        if len(chunks) > MAX_XORB_CHUNKS or total > MAX_XORB_BYTES:
            raise _bad_xorb(f"more than {MAX_XORB_CHUNKS} chunks or {MAX_XORB_BYTES} bytes")
        pos = end
    if not chunks:
        raise _bad_xorb("it holds no chunk")
    xorb = Xorb(merkle_hash([(c.hash, c.size) for c in chunks]), tuple(chunks), pos < len(view))
    if xorb.has_footer:
        _check_footer(view, pos, xorb)
    return xorb


def _check_footer(view: memoryview, pos: int, xorb: Xorb) -> None:
    if len(view) - pos < 12:
        raise _bad_xorb("truncated footer")
    (info_length,) = struct.unpack_from("<I", view, len(view) - 4)
    if info_length != len(view) - pos - 4:
        raise _bad_xorb(
            f"footer length {info_length} does not match the {len(view) - pos - 4} bytes after the chunks"
        )
    try:
        info = parse_xorb_footer(bytes(view[pos : len(view) - 4]))
    except (ValueError, struct.error) as e:
        raise _bad_xorb(f"unreadable footer ({e})") from None
    if info["hash"] != xorb.hash:
        raise _bad_xorb("the footer's xorb hash differs from the hash of its chunks")
    if info["chunk_hashes"] != [c.hash for c in xorb.chunks]:
        raise _bad_xorb("the footer's chunk hashes differ from the chunks")
    if info["boundaries"] != [c.end for c in xorb.chunks]:
        raise _bad_xorb("the footer's chunk boundaries differ from the chunks")
    unpacked, acc = info["unpacked_offsets"], 0
    for i, c in enumerate(xorb.chunks):
        acc += c.size
        if unpacked is not None and unpacked[i] != acc:
            raise _bad_xorb("the footer's unpacked offsets differ from the chunks")


def parse_xorb_footer(info: bytes) -> dict:
    """Fields of a CasObjectInfo footer (v0 or v1), without the trailing u32 length.

    Returns `{"version", "hash", "chunk_hashes", "boundaries", "unpacked_offsets" (None in v0)}`.
    """
    if info[:7] != XORB_IDENT:
        raise ValueError("no XETBLOB ident")
    version, h = info[7], info[8:40]
    if version == 0:
        (n,) = struct.unpack_from("<I", info, 40)
        if len(info) != 44 + 36 * n + 16:
            raise ValueError("v0 footer length")
        bounds = list(struct.unpack_from(f"<{n}I", info, 44))
        hashes = [info[44 + 4 * n + 32 * i : 44 + 4 * n + 32 * (i + 1)] for i in range(n)]
        return {
            "version": 0,
            "hash": h,
            "chunk_hashes": hashes,
            "boundaries": bounds,
            "unpacked_offsets": None,
        }
    if version != 1 or info[40:48] != b"XBLBHSH\x00":
        raise ValueError(f"footer version {version} or hash section ident")
    (n,) = struct.unpack_from("<I", info, 48)
    hashes = [info[52 + 32 * i : 84 + 32 * i] for i in range(n)]
    pos = 52 + 32 * n
    if info[pos : pos + 7] != b"XBLBBND" or info[pos + 7] != 1:
        raise ValueError("boundary section ident or version")
    (n2,) = struct.unpack_from("<I", info, pos + 8)
    if n2 != n or len(info) != pos + 12 + 8 * n + 12 + 16:
        raise ValueError("inconsistent chunk counts or length")
    bounds = list(struct.unpack_from(f"<{n}I", info, pos + 12))
    unpacked = list(struct.unpack_from(f"<{n}I", info, pos + 12 + 4 * n))
    (n3,) = struct.unpack_from("<I", info, pos + 12 + 8 * n)
    if n3 != n:
        raise ValueError("inconsistent chunk counts")
    return {
        "version": 1,
        "hash": h,
        "chunk_hashes": hashes,
        "boundaries": bounds,
        "unpacked_offsets": unpacked,
    }


def build_xorb(chunks: list[bytes], scheme: int = SCHEME_LZ4, footer: bool = True) -> tuple[str, bytes]:
    """Serialize chunks into a xorb the way hf_xet does (for tests and tools); return (hash string, bytes).

    A chunk whose compressed form is not smaller is stored with scheme None, like the reference client.
    """
    out, hashes, bounds, unpacked, acc = bytearray(), [], [], [], 0
    for data in chunks:
        body, used = data, SCHEME_NONE
        if scheme in (SCHEME_LZ4, SCHEME_BG4_LZ4):
            src = data if scheme == SCHEME_LZ4 else b"".join(data[k::4] for k in range(4))
            packed = lz4.frame.compress(src, store_size=False)
            if len(packed) < len(data):
                body, used = packed, scheme
        out += bytes([0]) + len(body).to_bytes(3, "little") + bytes([used]) + len(data).to_bytes(3, "little")
        out += body
        hashes.append(chunk_hash(data))
        acc += len(data)
        bounds.append(len(out))
        unpacked.append(acc)
    h = merkle_hash([(c, len(d)) for c, d in zip(hashes, chunks, strict=True)])
    if footer:
        n = len(chunks)
        boundary = b"XBLBBND\x01" + struct.pack(f"<I{n}I{n}II", n, *bounds, *unpacked, n)
        boundary_len = len(boundary) + 8 + 16
        hash_section = b"XBLBHSH\x00" + struct.pack("<I", n) + b"".join(hashes)
        info = XORB_IDENT + b"\x01" + h + hash_section + boundary
        info += struct.pack("<II", len(hash_section) + boundary_len, boundary_len) + bytes(16)
        out += info + struct.pack("<I", len(info))
    return hash_to_hex(h), bytes(out)
