"""Reading an NDJSON commit body (spooled to a temporary file) with bounded memory.

A regular file travels inline, base64-encoded in one JSON line. Parsing such a line with `json.loads`
holds the line, its decoded text, the content string and the decoded bytes at once (about 5x the
file). Lines above `BIG` bytes are therefore scanned for their string boundaries instead (quotes and
backslashes only, found at C speed); the file's `content`, the one string allowed to be that long, is
replaced by a placeholder before `json.loads` sees the line, and is decoded straight from the spool
file into the blob store, a chunk at a time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .blobs import BlobInfo, BlobStore, git_blob_sha1
from .errors import HubError, bad_request, too_large
from .storage import RepoKey, Storage, file_entry
from .validation import check_path, is_hex, utf8

BIG = 1 << 20
"""Lines longer than this are scanned instead of parsed whole."""
CHUNK = 1 << 20
"""Bytes of base64 decoded at a time (a multiple of 4)."""
PLACEHOLDER = "\u0000inline-content"
_SPECIAL = re.compile(rb'[\\"]')
_BASE64 = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


@dataclass(frozen=True)
class Span:
    """Where a long base64 `content` string lies in the spool file (without its quotes)."""

    start: int
    end: int


def too_large_inline(limit: int) -> HubError:
    """413 for a file sent inline although preupload asked for LFS."""
    return HubError(
        413,
        "PayloadTooLarge",
        f"Files above {limit} bytes cannot travel inline in the commit: upload them through Xet or LFS "
        "first (preupload answers 'lfs' for them; huggingface_hub does this by itself).",
    )


def _line_bounds(f: BinaryIO, per_file: int) -> Iterator[tuple[int, int]]:
    """`(start, end)` of each line (end excludes the newline), read a chunk at a time."""
    line_limit = per_file * 4 // 3 + 64 * 1024
    start = pos = 0
    while chunk := _pread(f, pos, CHUNK):
        at = 0
        while (nl := chunk.find(b"\n", at)) != -1:
            if pos + nl - start > line_limit:
                raise too_large_inline(per_file)
            yield start, pos + nl
            start, at = pos + nl + 1, nl + 1
        pos += len(chunk)
        if pos - start > line_limit:
            raise too_large_inline(per_file)
    if pos > start:
        yield start, pos


def parse_lines(f: BinaryIO, per_file: int) -> Iterator[tuple[int, Any, Span | None]]:
    """`(line number, parsed JSON, span of a long content string or None)` for each non-empty line.

    Raises:
        HubError: 400 for a line that is not JSON, 413 for a line too long for a `per_file` file.
    """
    for n, (start, end) in enumerate(_line_bounds(f, per_file), 1):
        if end - start <= BIG:
            raw = _pread(f, start, end - start)
            if raw.strip():
                yield n, _loads(raw, n), None
            continue
        spans = _string_spans(f, start, end)
        if len(spans) != 1:
            raise bad_request(
                f"Commit line {n}: only one file's base64 'content' may be longer than {BIG} bytes."
            )
        span = spans[0]
        head = _pread(f, start, span.start - start)
        tail = _pread(f, span.end, end - span.end)
        item = _loads(head + json.dumps(PLACEHOLDER)[1:-1].encode() + tail, n)
        value = item.get("value") if isinstance(item, dict) else None
        if not (
            isinstance(value, dict) and item.get("key") == "file" and value.get("content") == PLACEHOLDER
        ):
            raise bad_request(
                f"Commit line {n}: only a file's base64 'content' may be longer than {BIG} bytes."
            )
        yield n, item, span


def _string_spans(f: BinaryIO, start: int, end: int) -> list[Span]:
    """Spans (inside the quotes) of the JSON strings longer than `BIG` bytes in `[start, end)`."""
    spans: list[Span] = []
    inside, skip_at, opened = False, -1, 0
    pos = start
    while pos < end:
        chunk = _pread(f, pos, min(CHUNK, end - pos))
        for m in _SPECIAL.finditer(chunk):
            at = pos + m.start()
            if at == skip_at:  # the character after a backslash
                continue
            if m.group() == b"\\":
                if inside:
                    skip_at = at + 1
                continue
            if inside and at - opened - 1 > BIG:
                spans.append(Span(opened + 1, at))
            inside, opened = not inside, at
        pos += len(chunk)
    return spans


def _pread(f: BinaryIO, pos: int, n: int) -> bytes:
    """`n` bytes at `pos`, without moving the file position (line scanning and decoding interleave)."""
    return os.pread(f.fileno(), n, pos)


def _loads(raw: bytes, n: int) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request(f"Commit line {n} is not a {{'key': ..., 'value': {{...}}}} JSON object.") from None


def decoded_size(f: BinaryIO, span: Span) -> int:
    """Size of the bytes a base64 span decodes to (checked to be whole base64 quanta)."""
    length = span.end - span.start
    pad = _pread(f, span.end - 2, 2).count(b"=")
    if length % 4:
        raise bad_request("Inline file content is not valid base64 (its length is not a multiple of 4).")
    return length // 4 * 3 - pad


def store_span(f: BinaryIO, span: Span, blobs: BlobStore) -> BlobInfo:
    """Decode a base64 span of the spool file into the blob store, a chunk at a time."""
    size = decoded_size(f, span)
    out, tmp = blobs.new_temp()
    h256, h1, written = hashlib.sha256(), git_blob_sha1(size), 0
    try:
        for pos in range(span.start, span.end, CHUNK):
            chunk = _pread(f, pos, min(CHUNK, span.end - pos))
            last = pos + len(chunk) >= span.end
            if not _BASE64.match(chunk) or (not last and b"=" in chunk):
                raise bad_request("Inline file content is not valid base64.")
            data = base64.b64decode(chunk, validate=True)
            out.write(data)
            h256.update(data)
            h1.update(data)
            written += len(data)
    except (binascii.Error, ValueError, HubError, OSError) as e:
        out.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, (HubError, OSError)):  # an OSError is the disk's (full, failing), not the client's
            raise
        raise bad_request("Inline file content is not valid base64.") from None
    assert written == size
    return blobs.commit_temp(out, tmp, BlobInfo(h256.hexdigest(), h1.hexdigest(), size))


def inline_limit(cfg: Any) -> int:
    """Largest file accepted inline (base64 in the commit): the LFS threshold, at least 64 KiB.

    Larger files are answered `lfs` by preupload; holding them in memory is what LFS avoids.
    """
    return min(max(cfg.lfs_threshold_bytes, 64 * 1024), cfg.max_upload_bytes)


def _path(value: dict[str, Any], line: int, folder: bool = False) -> str:
    """The validated `path` of a commit line (400 `InvalidPath` unless it is a valid path string)."""
    path = value.get("path")
    if not isinstance(path, str):
        raise bad_request(
            f"Commit line {line}: 'path' must be a string such as 'dir/file.bin', got {type(path).__name__}.",
            "InvalidPath",
        )
    return check_path(path.rstrip("/") if folder else path)


def header_text(header: dict[str, Any], field: str, default: str) -> str:
    """A string field of the commit header (400 if it is not a string)."""
    value = header.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not utf8(value):
        raise bad_request(f"The commit header's {field!r} must be a string of UTF-8 text.")
    return value


def parse_commit(
    storage: Storage, cfg: Any, key: RepoKey, spool: Path
) -> tuple[dict[str, Any], list[tuple[str, str, dict | None]]]:
    """Header and operations of an NDJSON commit; stores inline files as blobs on the way.

    Raises:
        HubError: 400 for malformed lines, paths or content, 413 above the inline limits.
    """
    header: dict[str, Any] | None = None
    ops: list[tuple[str, str, dict | None]] = []
    per_file, inline_total = inline_limit(cfg), 0
    with open(spool, "rb") as f:
        for n, item, span in parse_lines(f, per_file):
            try:
                kind, value = item["key"], item["value"]
                if not isinstance(value, dict) or not isinstance(kind, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, RecursionError):
                raise bad_request(
                    f"Commit line {n} is not a {{'key': ..., 'value': {{...}}}} JSON object."
                ) from None
            if header is None:
                if kind != "header":
                    raise bad_request("The first commit line must be the header ({'key': 'header', ...}).")
                header = value
            elif kind == "file":
                path = _path(value, n)
                if value.get("encoding", "base64") != "base64":
                    raise bad_request(f"File {path!r}: only base64 encoding is supported.")
                content = value.get("content", "")
                if not isinstance(content, str):
                    raise bad_request(f"File {path!r}: 'content' must be a base64 string.")
                size = decoded_size(f, span) if span else len(content) // 4 * 3
                inline_total += size  # checked before decoding anything
                if size > per_file:
                    raise too_large_inline(per_file)
                if inline_total > cfg.max_upload_bytes:
                    raise too_large(inline_total, cfg.max_upload_bytes)
                info = store_span(f, span, storage.blobs) if span else _store_inline(storage, value, path)
                ops.append(("add", path, file_entry(info.sha256, info.sha1, info.size, False)))
            elif kind == "lfsFile":
                ops.append(_lfs_file(storage, key, value, n))
            elif kind in ("deletedFile", "deletedFolder"):
                path = _path(value, n, folder=kind == "deletedFolder")
                ops.append(("delete" if kind == "deletedFile" else "delete_folder", path, None))
            else:
                raise bad_request(f"Commit line {n}: unsupported key {kind!r}.")
    if header is None:
        raise bad_request("Empty commit: send a header line and operations as NDJSON.")
    parent = header.get("parentCommit")
    if parent is not None and not (isinstance(parent, str) and is_hex(parent, 40, 40)):
        raise bad_request(f"parentCommit must be a 40-hex commit id, got {parent!r}.", "InvalidRevision")
    return header, ops


def _lfs_file(storage: Storage, key: RepoKey, value: dict[str, Any], n: int) -> tuple[str, str, dict]:
    """The operation of an `lfsFile` line: an LFS object uploaded to this repo, of the size it claims."""
    path, oid = _path(value, n), value.get("oid")
    oid = oid if isinstance(oid, str) else ""
    if value.get("algo", "sha256") != "sha256" or not is_hex(oid, 64, 64):
        raise bad_request(f"LFS file {path!r}: expected algo 'sha256' and a 64-hex oid.")
    lfs = storage.lfs_object(key, oid)
    if lfs is None:
        raise bad_request(
            f"LFS object {oid} for {path!r} was not uploaded to this repo; upload it first "
            "(through Xet, or the LFS batch API), then commit.",
            "LfsObjectMissing",
        )
    if value.get("size") is not None and (not isinstance(value["size"], int) or value["size"] != lfs["size"]):
        raise bad_request(f"LFS file {path!r}: size {value['size']} does not match the uploaded object.")
    return "add", path, file_entry(oid, lfs["sha1"], lfs["size"], True)


def _store_inline(storage: Storage, value: dict[str, Any], path: str) -> BlobInfo:
    """Decode and store the `content` of a short file line."""
    content = value.pop("content", "")
    if not isinstance(content, str):
        raise bad_request(f"File {path!r}: 'content' must be a base64 string.")
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"File {path!r}: content is not valid base64.") from None
    return storage.blobs.put_bytes(data)
