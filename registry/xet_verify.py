"""Checks of a shard's files before they are registered, as `XetStore.put_shard` runs them.

Each CAS entry must list exactly the chunks of the stored xorb; each file segment must name a chunk
range of a stored xorb holding that many bytes; the file hash (and each verification entry) is
recomputed from the chunk hashes; the SHA-256 is computed from the reconstructed bytes, which a sink
may keep. A mixin of `XetStore` (xet_store.py), split out for size: it reads stored xorbs and
registered files, writes nothing on disk, and raises before the journal is written.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from .xet_format import XetError, file_hash, hash_to_hex, hex_to_hash, range_hash
from .xet_shard import ShardFile, ShardXorb

if TYPE_CHECKING:
    from .xet_store import PlainSink


class VerifyMixin:
    """`_check_cas_entry`, `_check_file` and `_sha256` of `XetStore` (see `put_shard`)."""

    def _check_cas_entry(self, x: ShardXorb) -> None:
        name = hash_to_hex(x.hash)
        meta = self._xorb_meta(name)
        offsets, acc = [], 0
        for size in meta.sizes:
            offsets.append(acc)
            acc += size
        listed = [(hash_to_hex(c.hash), c.offset, c.size) for c in x.chunks]
        if listed != list(zip(meta.hashes, offsets, meta.sizes, strict=True)):
            raise XetError(
                "ShardInvalid",
                f"Invalid shard: its CAS entry for xorb {name} does not list the chunks of the stored xorb; "
                "upload the shard hf_xet built for these xorbs (nothing was registered).",
            )

    def _check_file(self, f: ShardFile, plain: PlainSink | None) -> dict[str, Any]:
        name = hash_to_hex(f.file_hash)
        chunks: list[tuple[bytes, int]] = []
        segments = []
        for i, s in enumerate(f.segments):
            xorb = hash_to_hex(s.xorb)
            meta = self._xorb_meta(xorb)
            if s.end > len(meta.hashes) or sum(meta.sizes[s.start : s.end]) != s.size:
                raise XetError(
                    "ShardInvalid",
                    f"Invalid shard: segment {i} of file {name} names chunks [{s.start}, {s.end}) of xorb {xorb} "
                    f"with {s.size} bytes, which that xorb does not hold (nothing was registered).",
                )
            hashes = [hex_to_hash(h) for h in meta.hashes[s.start : s.end]]
            if f.verification is not None and f.verification[i] != range_hash(hashes):
                raise XetError(
                    "FileHashMismatch",
                    f"The verification entry of segment {i} of file {name} does not match the chunks of xorb "
                    f"{xorb}; upload the shard hf_xet built (nothing was registered).",
                )
            chunks.extend(zip(hashes, meta.sizes[s.start : s.end], strict=True))
            segments.append([xorb, s.start, s.end, s.size])
        actual = hash_to_hex(file_hash(chunks))
        if actual != name:
            raise XetError(
                "FileHashMismatch",
                f"The chunks a shard lists for file {name} hash to {actual}; upload the shard hf_xet built "
                "for this file (nothing was registered).",
            )
        known = self.file(name)
        sha = known.sha256 if known else self._sha256(segments, plain)
        claimed = hash_to_hex(f.sha256) if f.sha256 and any(f.sha256) else None
        if claimed is not None and claimed != sha:
            raise XetError(
                "FileHashMismatch",
                f"The shard says file {name} has SHA-256 {claimed}, its content has {sha}; "
                "upload the shard hf_xet built (nothing was registered).",
            )
        return {"file_hash": name, "sha256": sha, "size": f.size, "segments": segments}

    def _sha256(self, segments: list[list], plain: PlainSink | None) -> str:
        digest = hashlib.sha256()
        for piece in self._read_segments(segments, 0, None):
            digest.update(piece)
            if plain is not None:
                plain.write(piece)
        return digest.hexdigest()
