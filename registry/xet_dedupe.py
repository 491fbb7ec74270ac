"""The global dedupe index of the Xet store: which shards' xorbs to describe when a client asks about a chunk.

A dedupe-eligible chunk (a file's first chunk, or one whose hash the spec marks) is indexed under
every shard that registered a file holding it, most recent first, keeping the `DEDUPE_SHARDS` most
recent distinct sets of xorbs (`chunks/ab/<chunk hash>.json`: `{"shards": [[shard id, xorb set id],
...]}`). Shards whose files use the same xorbs (the same file pushed to another repo) count once,
so pushing one file to many repos does not push out the shard that holds its other versions. The
answer describes the xorbs of those shards (newest first, at most `DEDUPE_MAX_XORBS`): a client that
pushes a version the server holds, into a new repo, finds its chunks whichever shard it came by.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from .blobs import atomic_write_json, read_json
from .xet_format import hex_to_hash, is_global_dedupe_chunk, keyed_hash
from .xet_read import XorbMeta
from .xet_shard import CHUNK_FLAG_GLOBAL_DEDUPE, ShardChunk, ShardXorb, build_shard

DEDUPE_EXPIRY_S = 7 * 24 * 3600
"""How long a client may keep a dedupe answer in its shard cache."""
DEDUPE_MAX_XORBS = 128
"""Most xorbs described in one dedupe answer."""
DEDUPE_SHARDS = 8
"""Most distinct xorb sets (shards) a chunk is indexed under; the most recent are kept."""


def xorb_set_id(xorbs: list[str]) -> str:
    """An id of a set of xorb hashes (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(xorbs)).encode()).hexdigest()


def index_entries(path: Path) -> list[list[str]]:
    """`[shard id, xorb set id]` pairs a chunk is indexed under, newest first (empty if none).

    Reads the older one-shard form `{"shard": id}` too (its xorb set id is empty)."""
    if not path.is_file():
        return []
    raw = read_json(path)
    if "shard" in raw:
        return [[raw["shard"], ""]]
    return [list(e) for e in raw.get("shards", [])]


def index_chunk(path: Path, shard_id: str, set_id: str, tmp: Path) -> None:
    """Put `shard_id` first in a chunk's index entry; drop an older shard with the same xorb set and
    keep the `DEDUPE_SHARDS` most recent. Idempotent, so a replayed journal may apply it again."""
    old = [e for e in index_entries(path) if e[0] != shard_id and e[1] != set_id]
    entries = [[shard_id, set_id], *old][:DEDUPE_SHARDS]
    atomic_write_json(path, {"shards": entries}, tmp)


def unindex_shards(path: Path, gone: set[str], tmp: Path) -> None:
    """Drop the shards in `gone` from a chunk's index entry; remove the entry if none is left (gc)."""
    entries = index_entries(path)
    kept = [e for e in entries if e[0] not in gone]
    if not kept:
        path.unlink(missing_ok=True)
    elif len(kept) != len(entries):
        atomic_write_json(path, {"shards": kept}, tmp)


def shard_xorb(xorb: str, meta: XorbMeta, key: bytes) -> ShardXorb:
    """CAS info of a stored xorb for a dedupe answer, its chunk hashes keyed with `key`."""
    chunks, offset = [], 0
    for h, size in zip(meta.hashes, meta.sizes, strict=True):
        raw = hex_to_hash(h)
        flags = CHUNK_FLAG_GLOBAL_DEDUPE if is_global_dedupe_chunk(raw) else 0
        chunks.append(ShardChunk(keyed_hash(raw, key), offset, size, flags))
        offset += size
    return ShardXorb(hex_to_hash(xorb), tuple(chunks), meta.ends[-1])


def dedupe_answer(
    index: Path,
    shard_path: Callable[[str], Path],
    has_xorb: Callable[[str], bool],
    meta_of: Callable[[str], XorbMeta],
    key: bytes,
) -> bytes | None:
    """The dedupe answer for the chunk whose index entry is `index` (see `XetStore.dedupe_shard`), or None."""
    names: dict[str, None] = {}
    for shard_id, _ in index_entries(index):
        path = shard_path(shard_id)
        if path.is_file():
            names.update(dict.fromkeys(x for x in read_json(path)["xorbs"] if has_xorb(x)))
    xorbs = [shard_xorb(x, meta_of(x), key) for x in list(names)[:DEDUPE_MAX_XORBS]]
    if not xorbs:
        return None
    return build_shard([], xorbs, hmac_key=key, expiry=int(time.time()) + DEDUPE_EXPIRY_S)
