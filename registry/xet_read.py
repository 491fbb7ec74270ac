"""Reading registered Xet files: reconstruction answers for Xet clients, plain bytes for the others.

A file record lists segments `[xorb hash, first chunk, end chunk, bytes]`; a xorb's chunk index
(`XorbMeta`) gives each chunk's hash, end offset in the stored xorb and uncompressed size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .xet_format import XetError, Xorb, chunk_hash, hash_to_hex, read_chunk


@dataclass(frozen=True)
class XorbMeta:
    """Chunk index of a stored xorb: hash strings, end offsets in the xorb bytes, uncompressed sizes."""

    hashes: list[str]
    ends: list[int]
    sizes: list[int]

    def start(self, i: int) -> int:
        """Offset of chunk `i`'s header in the xorb bytes."""
        return self.ends[i - 1] if i else 0


MetaOf = Callable[[str], XorbMeta]


def xorb_index(xorb: Xorb) -> dict[str, list]:
    """The chunk index stored beside a xorb's bytes (`<xorb hash>.json`, read back as `XorbMeta`)."""
    return {
        "hashes": [hash_to_hex(c.hash) for c in xorb.chunks],
        "ends": [c.end for c in xorb.chunks],
        "sizes": [c.size for c in xorb.chunks],
    }


def clamp(record: dict[str, Any], byte_range: tuple[int, int] | None) -> tuple[int, int]:
    """`[start, end)` within the file; an end past the file is clamped. Raises `RangeNotSatisfiable`."""
    size = record["size"]
    if byte_range is None:
        return 0, size
    start, end = byte_range[0], min(byte_range[1], size)
    if start < 0 or start >= end:
        raise XetError(
            "RangeNotSatisfiable",
            f"Byte range [{byte_range[0]}, {byte_range[1]}) is outside file {record['file_hash']} "
            f"of {size} bytes; ask for a range within the file.",
        )
    return start, end


def chunk_ranges(
    segments: list[list], meta_of: MetaOf, start: int, end: int
) -> Iterator[tuple[str, int, int, int]]:
    """(xorb, first chunk, end chunk, bytes to skip in the first chunk) covering file bytes [start, end)."""
    offset = 0
    for xorb, lo, hi, size in segments:
        if offset + size <= start:
            offset += size
            continue
        if offset >= end:
            return
        sizes = meta_of(xorb).sizes
        first, pos = lo, offset
        while pos + sizes[first] <= start:
            pos, first = pos + sizes[first], first + 1
        last, stop = first, pos
        while last < hi and stop < end:
            stop, last = stop + sizes[last], last + 1
        yield xorb, first, last, max(start - pos, 0)
        offset += size


def reconstruction_v1(
    record: dict[str, Any],
    byte_range: tuple[int, int] | None,
    meta_of: MetaOf,
    xorb_url: Callable[[str], str],
) -> dict:
    """QueryReconstructionResponse of a file record (see `XetStore.reconstruction`)."""
    start, end = clamp(record, byte_range)
    terms: list[dict] = []
    fetch: dict[str, list[dict]] = {}
    first_offset = 0
    for xorb, lo, hi, skip in chunk_ranges(record["segments"], meta_of, start, end):
        meta = meta_of(xorb)
        if not terms:
            first_offset = skip
        chunks = {"start": lo, "end": hi}
        terms.append({"hash": xorb, "unpacked_length": sum(meta.sizes[lo:hi]), "range": chunks})
        info = {
            "range": chunks,
            "url": xorb_url(xorb),
            "url_range": {"start": meta.start(lo), "end": meta.ends[hi - 1] - 1},
        }
        if info not in fetch.setdefault(xorb, []):
            fetch[xorb].append(info)
    return {"offset_into_first_range": first_offset, "terms": terms, "fetch_info": fetch}


def v1_to_v2(v1: dict) -> dict:
    """QueryReconstructionResponseV2 from a v1 answer: one single-range fetch per v1 fetch entry."""
    xorbs = {
        xorb: [{"url": i["url"], "ranges": [{"chunks": i["range"], "bytes": i["url_range"]}]} for i in infos]
        for xorb, infos in v1["fetch_info"].items()
    }
    return {"offset_into_first_range": v1["offset_into_first_range"], "terms": v1["terms"], "xorbs": xorbs}


def read_segments(
    segments: list[list], meta_of: MetaOf, path_of: Callable[[str], Path], start: int, end: int | None
) -> Iterator[bytes]:
    """Bytes `[start, end)` of a file, one chunk in memory at a time, each checked against its hash.

    Raises:
        XetError: `XorbCorrupt` when a stored chunk no longer matches its hash (run fsck).
    """
    end = sum(s[3] for s in segments) if end is None else end
    remaining = end - start
    for xorb, lo, hi, skip in chunk_ranges(segments, meta_of, start, end):
        meta = meta_of(xorb)
        with open(path_of(xorb), "rb") as f:
            f.seek(meta.start(lo))
            for i in range(lo, hi):
                raw = memoryview(f.read(meta.ends[i] - meta.start(i)))
                try:
                    data, used = read_chunk(raw, 0)
                except XetError:
                    data, used = b"", -1
                if used != len(raw) or hash_to_hex(chunk_hash(data)) != meta.hashes[i]:
                    raise XetError("XorbCorrupt", f"Chunk {i} of stored xorb {xorb} is corrupt; run fsck.")
                piece = data[skip : skip + remaining]
                skip, remaining = 0, remaining - len(piece)
                if piece:
                    yield piece
