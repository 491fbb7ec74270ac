"""Xet content-addressed storage: verified xorbs, files registered by shards, reconstruction, dedupe.

Layout under the root (`<registry data dir>/xet`)::

    xorbs/ab/<xorb hash>          verified xorb bytes, exactly as the client sent them
    xorbs/ab/<xorb hash>.json     its chunks: hashes, end offsets in the xorb, uncompressed sizes
    files/ab/<file hash>.json     a registered file: size, sha256, segments [xorb, chunk start, end, bytes]
    sha256/ab/<sha256>.json       the Xet file hash of a registered file with this SHA-256
    shards/ab/<shard id>.json     a registered shard: the xorbs its files use (dedupe answers)
    chunks/ab/<chunk hash>.json   global dedupe index: the shards whose files hold this chunk (xet_dedupe)
    pending/<shard id>.json       registration journal of a shard (replayed at start)
    dedupe_key.json               the key chunk hashes are keyed with in dedupe answers
    tmp/                          temporary files

Every hash string is validated (64 lowercase hex characters) before it becomes a path. Every file is
written to `tmp/`, fsynced and renamed into place. A shard's files become visible through one
journal: it is written (atomically) only after the whole shard verified (`xet_verify.py`), then its
records are applied and it is removed; a journal left by a crash is applied at the next start, so a
crash leaves all or none of a shard's files registered.

Dedupe answers show chunk hashes keyed with a secret of this store (`dedupe_key.json`, named in the
answer's footer as the spec's `chunk_hash_hmac_key`): a client learns which xorb holds a chunk it has,
never the plain hashes of the other chunks, and registering a file needs all of its chunk hashes (the
file hash and the verification entries are checked), so an answer cannot be turned into access to
content the client does not hold.

Create one `XetStore` per registry root (at server start): it replays journals, puts back xorbs an
interrupted gc left aside and clears stale temporary files when constructed (`xet_repair`). `XetStore(root, read_only=True)` (fsck, maybe while a server runs)
changes nothing on disk: journals stay pending for the server to apply.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .blobs import atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from .flock import XET_APPLY_LOCK, file_lock
from .xet_check import check_store, store_stats
from .xet_dedupe import dedupe_answer, index_chunk, xorb_set_id
from .xet_format import XetError, check_hash, hash_to_hex, hex_to_hash, is_global_dedupe_chunk, parse_xorb
from .xet_read import XorbMeta, clamp, read_segments, reconstruction_v1, v1_to_v2, xorb_index
from .xet_repair import clear_tmp, restore_xorb
from .xet_shard import CHUNK_FLAG_GLOBAL_DEDUPE, Shard, parse_shard
from .xet_verify import VerifyMixin

__all__ = ["PlainSink", "XetError", "XetFile", "XetStore"]

_META_CACHE = 256


class PlainSink(Protocol):
    """Where `put_shard` writes the plain bytes of a file while it computes their SHA-256."""

    def write(self, piece: bytes) -> Any: ...

    def discard(self) -> None: ...


@dataclass(frozen=True)
class XetFile:
    """A file registered by a shard: its Xet file hash, its SHA-256 and its size in bytes.

    `plain` is the sink `put_shard` wrote the file's bytes into (exactly the bytes whose SHA-256 is
    `sha256`), or None when it did not reconstruct the file (already registered, or no sink asked)."""

    file_hash: str
    sha256: str
    size: int
    plain: PlainSink | None = field(default=None, compare=False, repr=False)


class XetStore(VerifyMixin):
    """Verified Xet objects of one registry.

    Args:
        root: `<registry data dir>/xet`; its folders are created.
        read_only: Change nothing on disk (for fsck, which may run beside a live server): no folders
            or key created, no temporary file removed, no journal replayed (see `pending`); only the
            reads and `fsck` may be called.
    """

    def __init__(self, root: Path, read_only: bool = False) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.read_only = read_only
        self._lock = threading.Lock()
        self._meta: dict[str, XorbMeta] = {}
        self._meta_lock = threading.Lock()
        key_path = self.root / "dedupe_key.json"
        self._key = bytes.fromhex(read_json(key_path)["key"]) if key_path.is_file() else b""
        if read_only:
            return
        for name in ("xorbs", "files", "sha256", "shards", "chunks", "pending", "tmp"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        if not self._key:
            atomic_write_json(key_path, {"key": secrets.token_hex(32)}, self.tmp)
            self._key = bytes.fromhex(read_json(key_path)["key"])
        clear_tmp(self.root)  # puts back the xorbs an interrupted gc left aside first
        with file_lock(self.root / XET_APPLY_LOCK):
            for journal in self.pending():
                self._apply(journal)

    def pending(self) -> list[Path]:
        """Shard journals not applied yet: left by a crash (the next start applies them) or in flight."""
        return sorted((self.root / "pending").glob("*.json"))

    def _path(self, folder: str, name: str, suffix: str = "") -> Path:
        check_hash(name)
        return self.root / folder / name[:2] / f"{name}{suffix}"

    # xorbs

    def put_xorb(self, xorb_hash: str, data: bytes) -> bool:
        """Verify and store a xorb.

        Validates the hash string, parses every chunk, decompresses it, recomputes the chunk hashes
        and the xorb hash, which must equal `xorb_hash`, before writing atomically.

        Returns:
            True if the xorb is new, False if it was already stored (its time is then refreshed, as a
            dedupe answer refreshes it: the client skips it from now on, so `gc` keeps it).

        Raises:
            XetError: `InvalidHash`, `XorbInvalid` (bad framing or compression), `XorbHashMismatch`.
        """
        self._writable()
        check_hash(xorb_hash, "xorb hash")
        if self._named(xorb_hash):
            return False
        xorb = parse_xorb(data)
        actual = hash_to_hex(xorb.hash)
        if actual != xorb_hash:
            raise XetError(
                "XorbHashMismatch",
                f"The xorb's content hashes to {actual}, not to {xorb_hash} as its URL says; "
                "upload the xorb under its own hash (nothing was stored).",
            )
        with file_lock(self.root / XET_APPLY_LOCK):  # `gc` removes the pair under it: never one of the two
            atomic_write_json(self._path("xorbs", xorb_hash, ".json"), xorb_index(xorb), self.tmp)
            atomic_write_bytes(self._path("xorbs", xorb_hash), data, self.tmp)
        return True

    def has_xorb(self, xorb_hash: str) -> bool:
        """Whether a verified xorb with this hash is stored."""
        return self._path("xorbs", xorb_hash).is_file()

    def _named(self, xorb_hash: str) -> bool:
        """Whether a xorb is stored; if so, mark it as just named (in a dedupe answer, an upload or a
        shard): a client may skip uploading its chunks for a while, so `gc` keeps it (see `xet_gc`)."""
        try:
            os.utime(self._path("xorbs", xorb_hash))
        except OSError:
            return False
        return True

    def xorb_path(self, xorb_hash: str) -> Path:
        """Path of the stored xorb bytes (for byte-range GETs); raises XetError `XorbMissing` if absent."""
        path = self._path("xorbs", xorb_hash)
        if not path.is_file() and (self.read_only or not restore_xorb(self.root, xorb_hash)):
            raise XetError("XorbMissing", f"Xorb {xorb_hash} is not stored: upload it (POST /v1/xorbs).")
        return path

    def _xorb_meta(self, xorb_hash: str) -> XorbMeta:
        meta = self._meta.get(xorb_hash)
        if meta is None:
            path = self.xorb_path(xorb_hash)
            try:
                raw = read_json(path.with_name(f"{xorb_hash}.json"))
            except FileNotFoundError:  # a gc removed the pair since: the bytes first, then this
                self.xorb_path(xorb_hash)  # XorbMissing
                raise
            meta = XorbMeta(raw["hashes"], raw["ends"], raw["sizes"])
            with self._meta_lock:  # request threads share the cache
                if len(self._meta) >= _META_CACHE:
                    self._meta.pop(next(iter(self._meta)))
                self._meta[xorb_hash] = meta
        return meta

    # shards and files

    def put_shard(self, data: bytes, sink: Callable[[int], PlainSink] | None = None) -> list[XetFile]:
        """Verify a shard and register its files, atomically and idempotently.

        Each CAS entry's xorb must be stored with the same chunk list; each file's segments must
        refer to chunk ranges of stored xorbs; the file hash recomputed from the chunk hashes (and
        each verification entry) must match; the SHA-256 is computed by reconstructing the file and
        must equal the one in the metadata extension, if any. A crash leaves all or none of the
        shard's files registered.

        Args:
            data: The shard body.
            sink: Called with the size of each file it reconstructs (one not registered yet): the
                file's bytes are written into the sink during the SHA-256 pass and handed back as
                `XetFile.plain`, so the caller keeps them without reconstructing them again. When
                the shard is refused, every sink is discarded.

        Returns:
            The files of the shard (already registered ones included), in shard order.

        Raises:
            XetError: `ShardInvalid`, `XorbMissing`, `FileHashMismatch`.
        """
        self._writable()
        shard = parse_shard(data)
        if any(shard.hmac_key):
            raise XetError(
                "ShardInvalid", "Invalid shard: its chunk hashes are keyed; upload plain chunk hashes."
            )
        for x in shard.xorbs:
            self._check_cas_entry(x)
        records: list[dict[str, Any]] = []
        plains: list[PlainSink | None] = []
        try:
            self._register(data, shard, records, plains, sink)
        except BaseException:
            for plain in plains:
                if plain is not None:
                    plain.discard()
            raise
        return [
            XetFile(r["file_hash"], r["sha256"], r["size"], p) for r, p in zip(records, plains, strict=True)
        ]

    def _register(
        self,
        data: bytes,
        shard: Shard,
        records: list[dict[str, Any]],
        plains: list[PlainSink | None],
        sink: Callable[[int], PlainSink] | None,
    ) -> None:
        """Check each file (appending its record and plain sink as it goes), then journal and apply."""
        xorbs: dict[str, None] = {}
        eligible: set[str] = set()
        for f in shard.files:
            plains.append(
                sink(f.size) if sink is not None and self.file(hash_to_hex(f.file_hash)) is None else None
            )
            record = self._check_file(f, plains[-1])
            records.append(record)
            for xorb, start, _end, _size in record["segments"][:1]:
                eligible.add(self._xorb_meta(xorb).hashes[start])
            for xorb, *_ in record["segments"]:
                xorbs.setdefault(xorb, None)
        for x in shard.xorbs:
            xorbs.setdefault(hash_to_hex(x.hash), None)
            eligible.update(hash_to_hex(c.hash) for c in x.chunks if c.flags & CHUNK_FLAG_GLOBAL_DEDUPE)
        for xorb in xorbs:
            eligible.update(h for h in self._xorb_meta(xorb).hashes if is_global_dedupe_chunk(hex_to_hash(h)))
        shard_id = hashlib.sha256(data).hexdigest()
        journal = {"shard": shard_id, "xorbs": list(xorbs), "files": records, "chunks": sorted(eligible)}
        path = self.root / "pending" / f"{shard_id}.json"
        with self._lock, file_lock(self.root / XET_APPLY_LOCK):  # `gc` and `backup` take it too
            gone = [x for x in xorbs if not self._named(x)]  # touched (`gc` keeps them), or collected
            if gone:
                raise XetError("XorbMissing", f"Xorb {gone[0]} is not stored; upload it and the shard again.")
            atomic_write_json(path, journal, self.tmp)
            self._apply(path)

    def _writable(self) -> None:
        if self.read_only:
            raise XetError("ReadOnly", "This Xet store was opened read-only (fsck); the server writes to it.")

    def _apply(self, journal_path: Path) -> None:
        journal = read_json(journal_path)
        shard_id = journal["shard"]
        atomic_write_json(self._path("shards", shard_id, ".json"), {"xorbs": journal["xorbs"]}, self.tmp)
        for record in journal["files"]:
            atomic_write_json(self._path("files", record["file_hash"], ".json"), record, self.tmp)
            sha_path = self._path("sha256", record["sha256"], ".json")
            atomic_write_json(sha_path, {"file_hash": record["file_hash"]}, self.tmp)
        set_id = xorb_set_id(journal["xorbs"])
        for h in journal["chunks"]:
            index_chunk(self._path("chunks", h, ".json"), shard_id, set_id, self.tmp)
        journal_path.unlink(missing_ok=True)
        fsync_dir(journal_path.parent)

    def file(self, file_hash: str) -> XetFile | None:
        """The registered file with this Xet hash, or None."""
        record = self._record(file_hash)
        return XetFile(record["file_hash"], record["sha256"], record["size"]) if record else None

    def file_by_sha256(self, sha256: str) -> XetFile | None:
        """A registered file with this SHA-256, or None."""
        path = self._path("sha256", sha256, ".json")
        return self.file(read_json(path)["file_hash"]) if path.is_file() else None

    def _record(self, file_hash: str) -> dict[str, Any] | None:
        path = self._path("files", file_hash, ".json")
        return read_json(path) if path.is_file() else None

    def _require(self, file_hash: str) -> dict[str, Any]:
        record = self._record(check_hash(file_hash, "file hash"))
        if record is None:
            raise XetError(
                "FileNotFound", f"No file with Xet hash {file_hash} is registered; upload its shard first."
            )
        return record

    # reads

    def reconstruction(
        self, file_hash: str, byte_range: tuple[int, int] | None, xorb_url: Callable[[str], str]
    ) -> dict:
        """JSON body answering `GET /v1/reconstructions/{file_hash}` (QueryReconstructionResponse).

        Args:
            file_hash: A registered file.
            byte_range: `(start, end)` inclusive-exclusive over file bytes, or None for the whole file;
                an end past the file is clamped.
            xorb_url: Maps a xorb hash to the URL the client GETs it from (with a `Range` header).

        Returns:
            `{"offset_into_first_range", "terms": [{"hash", "unpacked_length", "range": {"start",
            "end"}}], "fetch_info": {xorb_hash: [{"range", "url", "url_range": {"start", "end"}}]}}`;
            chunk ranges are end-exclusive, `url_range` is inclusive (an HTTP Range).

        Raises:
            XetError: `InvalidHash`, `FileNotFound`, `RangeNotSatisfiable` (answer 416).
        """
        return reconstruction_v1(self._require(file_hash), byte_range, self._xorb_meta, xorb_url)

    def reconstruction_v2(
        self, file_hash: str, byte_range: tuple[int, int] | None, xorb_url: Callable[[str], str]
    ) -> dict:
        """JSON body answering `GET /v2/reconstructions/{file_hash}` (QueryReconstructionResponseV2):
        the same terms, with `xorbs: {xorb_hash: [{"url", "ranges": [{"chunks", "bytes"}]}]}`, one
        range per URL (so the client's `Range` header is always a single range)."""
        return v1_to_v2(self.reconstruction(file_hash, byte_range, xorb_url))

    def read_file(self, file_hash: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Plain bytes `[start, end)` of a registered file, reconstructed from its xorbs, one chunk at a time.

        Every chunk is checked against its hash as it is read (XetError `XorbCorrupt` otherwise).

        Raises:
            XetError: `InvalidHash`, `FileNotFound`, `RangeNotSatisfiable` (at the call, not while iterating).
        """
        record = self._require(file_hash)
        if start == 0 and (end is None or end >= record["size"]):
            return self._read_segments(record["segments"], 0, None)
        lo, hi = clamp(record, (start, record["size"] if end is None else end))
        return self._read_segments(record["segments"], lo, hi)

    def _read_segments(self, segments: list[list], start: int, end: int | None) -> Iterator[bytes]:
        return read_segments(segments, self._xorb_meta, self.xorb_path, start, end)

    # dedupe, checks

    def dedupe_shard(self, chunk_hash: str) -> bytes | None:
        """Answer to `GET /v1/chunks/default-merkledb/{chunk_hash}`: a shard with the CAS info of the
        xorbs used by the files of the shards that indexed that chunk (the `DEDUPE_SHARDS` most recent
        distinct xorb sets, newest first, at most `DEDUPE_MAX_XORBS` xorbs; no file section; chunk
        hashes keyed with this store's key, named in the footer), or None (answer 404)."""
        return dedupe_answer(
            self._path("chunks", chunk_hash, ".json"),
            lambda shard: self._path("shards", shard, ".json"),
            self._named,
            self._xorb_meta,
            self._key,
        )

    def fsck(self) -> list[str]:
        """Every problem found: xorb bytes vs their hash, registered files with a missing xorb, bad shards."""
        return check_store(self)

    def stats(self) -> dict:
        """Counts and bytes: `{"xorbs", "xorb_bytes", "files", "file_bytes", "shards", "chunks_indexed"}`."""
        return store_stats(self.root)
