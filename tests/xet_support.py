"""Shared helpers of the Xet store tests: xorbs and shard entries built from chunks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
from adapterkit_registry.xet_format import build_xorb, chunk_hash, file_hash, hex_to_hash
from adapterkit_registry.xet_shard import Segment, ShardChunk, ShardFile, ShardXorb


def xorb_parts(chunks: list[bytes]) -> tuple[str, bytes, ShardXorb]:
    """A xorb of these chunks: its hash string, its bytes and its CAS entry for a shard."""
    name, data = build_xorb(chunks)
    entries, offset = [], 0
    for c in chunks:
        entries.append(ShardChunk(chunk_hash(c), offset, len(c)))
        offset += len(c)
    return name, data, ShardXorb(hex_to_hash(name), tuple(entries), len(data))


def shard_file(name: str, chunks: list[bytes], lo: int, hi: int, sha: bool = True) -> ShardFile:
    """A file made of chunks [lo, hi) of xorb `name`, with its SHA-256 (as hf_xet lays it out) unless `sha` is False."""
    part = chunks[lo:hi]
    digest = hashlib.sha256(b"".join(part)).digest()
    words = b"".join(digest[i : i + 8][::-1] for i in range(0, 32, 8))  # hf_xet's layout of the sha256
    seg = Segment(hex_to_hash(name), sum(len(c) for c in part), lo, hi)
    return ShardFile(file_hash([(chunk_hash(c), len(c)) for c in part]), (seg,), None, words if sha else None)


CHUNKS = [os.urandom(3000) + bytes([i]) * 4000 for i in range(12)]


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m adapterkit_registry ARGS` (the registry's command line), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "adapterkit_registry", *args], capture_output=True, text=True, timeout=300
    )


def data(seed: int) -> bytes:
    """300 KB of seeded random bytes: a file the client sends through Xet."""
    return np.random.default_rng(seed).bytes(300_000)
