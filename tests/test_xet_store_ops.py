"""The Xet store without a client: the dedupe index across families, the plain sink of `put_shard`,
and the read-only store fsck opens beside a live server."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from adapterkit_registry.xet_dedupe import DEDUPE_SHARDS
from adapterkit_registry.xet_format import XetError, chunk_hash, file_hash, hash_to_hex, hex_to_hash
from adapterkit_registry.xet_shard import Segment, ShardFile, build_shard, parse_shard
from adapterkit_registry.xet_store import XetStore
from xet_support import CHUNKS, shard_file, xorb_parts


def _answer_xorbs(store: XetStore, chunk: bytes) -> set[str]:
    answer = store.dedupe_shard(hash_to_hex(chunk_hash(chunk)))
    return {hash_to_hex(x.hash) for x in parse_shard(answer).xorbs} if answer else set()


def test_dedupe_answer_names_the_xorbs_of_every_recent_shard_holding_the_chunk(tmp_path):
    """v1 in xorb X1; v2 = v1 with chunk 3 replaced, the new chunk in X2; v1 registered again by many
    shards (other families): asked about their shared first chunk, the store still names X2. Only the
    `DEDUPE_SHARDS` most recent distinct xorb sets are kept."""
    store = XetStore(tmp_path / "xet")
    x1, d1, e1 = xorb_parts(CHUNKS[:6])
    new_chunk = os.urandom(5000)
    x2, d2, e2 = xorb_parts([new_chunk])
    store.put_xorb(x1, d1)
    store.put_xorb(x2, d2)
    v1 = shard_file(x1, CHUNKS, 0, 6)
    v2_chunks = [*CHUNKS[:3], new_chunk, *CHUNKS[4:6]]
    segments = (
        Segment(hex_to_hash(x1), sum(map(len, CHUNKS[:3])), 0, 3),
        Segment(hex_to_hash(x2), len(new_chunk), 0, 1),
        Segment(hex_to_hash(x1), sum(map(len, CHUNKS[4:6])), 4, 6),
    )
    v2 = ShardFile(file_hash([(chunk_hash(c), len(c)) for c in v2_chunks]), segments, None, None)
    store.put_shard(build_shard([v1], [e1]))
    store.put_shard(build_shard([v2], [e2]))
    for family in range(DEDUPE_SHARDS + 2):  # v1 pushed to more families than the index keeps shards
        store.put_shard(build_shard([v1], [], expiry=family))
    assert _answer_xorbs(store, CHUNKS[0]) == {x1, x2}
    others = []
    for _ in range(DEDUPE_SHARDS):  # as many newer shards, each with its own xorb set
        extra = [CHUNKS[0], os.urandom(4000)]
        name, data, _ = xorb_parts(extra)
        store.put_xorb(name, data)
        store.put_shard(build_shard([shard_file(name, extra, 0, 2)], []))
        others.append(name)
    assert _answer_xorbs(store, CHUNKS[0]) == set(others)  # the oldest sets, v1's and v2's, fell out


class _FileSink:
    """A plain sink writing to a file (what the registry does with a temporary blob)."""

    def __init__(self, path: Path):
        self.path, self.out, self.discarded = path, open(path, "wb"), False

    def write(self, piece: bytes) -> None:
        self.out.write(piece)

    def discard(self) -> None:
        self.out.close()
        self.path.unlink(missing_ok=True)
        self.discarded = True


def test_put_shard_writes_the_plain_bytes_it_hashed_into_the_sink(tmp_path):
    store = XetStore(tmp_path / "xet")
    name, data, cas_entry = xorb_parts(CHUNKS)
    store.put_xorb(name, data)
    sinks: list[_FileSink] = []

    def sink(size: int) -> _FileSink:
        sinks.append(_FileSink(tmp_path / f"plain{len(sinks)}"))
        return sinks[-1]

    good, other = shard_file(name, CHUNKS, 2, 7), shard_file(name, CHUNKS, 0, 4)
    wrong_sha = ShardFile(other.file_hash, other.segments, None, hashlib.sha256(b"other").digest())
    with pytest.raises(XetError):
        store.put_shard(build_shard([good, wrong_sha], [cas_entry]), sink=sink)
    assert [s.discarded for s in sinks] == [True, True] and not list(tmp_path.glob("plain*"))
    assert store.file(hash_to_hex(good.file_hash)) is None
    sinks.clear()
    (xf,) = store.put_shard(build_shard([good], [cas_entry]), sink=sink)
    assert xf.plain is sinks[0] and not sinks[0].discarded
    sinks[0].out.close()
    assert sinks[0].path.read_bytes() == b"".join(CHUNKS[2:7])
    assert hashlib.sha256(sinks[0].path.read_bytes()).hexdigest() == xf.sha256
    (again,) = store.put_shard(build_shard([good], [], expiry=1), sink=sink)
    assert again.plain is None and len(sinks) == 1  # registered already: not reconstructed again


def test_read_only_store_changes_nothing_and_leaves_journals_pending(tmp_path):
    """fsck opens the store read-only: a journal a crash left (or one in flight) stays for the server,
    a stale temporary file stays, and nothing is reported as a problem; the next start applies it."""
    root = tmp_path / "xet"
    store = XetStore(root)
    name, data, _ = xorb_parts(CHUNKS)
    store.put_xorb(name, data)
    content = b"".join(CHUNKS[1:5])
    f = hash_to_hex(file_hash([(chunk_hash(c), len(c)) for c in CHUNKS[1:5]]))
    sha = hashlib.sha256(content).hexdigest()
    record = {"file_hash": f, "sha256": sha, "size": len(content), "segments": [[name, 1, 5, len(content)]]}
    journal = root / "pending" / f"{'ab' * 32}.json"
    journal.write_text(json.dumps({"shard": "ab" * 32, "xorbs": [name], "files": [record], "chunks": []}))
    (root / "files" / f[:2]).mkdir(parents=True, exist_ok=True)
    (root / "files" / f[:2] / f"{f}.json").write_text(json.dumps(record))  # applied up to here
    stale = root / "tmp" / "w-stale"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    ro = XetStore(root, read_only=True)
    assert ro.fsck() == [] and ro.pending() == [journal] and ro.file_by_sha256(sha) is None
    with pytest.raises(XetError) as e:
        ro.put_xorb(name, data)
    assert e.value.code == "ReadOnly"
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    started = XetStore(root)  # a server start replays the journal and clears the stale file
    assert started.file_by_sha256(sha).file_hash == f and started.pending() == [] and not stale.exists()
    assert b"".join(started.read_file(f)) == content and started.fsck() == []
