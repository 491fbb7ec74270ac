"""Xet hashing, xorb and shard formats against xet-core's reference vectors and hf_xet itself."""

from __future__ import annotations

import hashlib
import os

import hf_xet
import pytest
from adapterkit_registry.xet_format import (
    SCHEME_BG4_LZ4,
    SCHEME_LZ4,
    SCHEME_NONE,
    XetError,
    build_xorb,
    check_hash,
    chunk_hash,
    file_hash,
    hash_to_hex,
    hex_to_hash,
    is_global_dedupe_chunk,
    merkle_hash,
    parse_xorb,
    parse_xorb_footer,
)
from adapterkit_registry.xet_shard import (
    Segment,
    ShardChunk,
    ShardFile,
    ShardXorb,
    build_shard,
    parse_shard,
)

# Reference vectors of xet-core (xet_core_structures/src/merklehash/aggregated_hashes.rs, test_correctness):
# (chunk hashes and sizes, xorb hash, [(salt, file hash)]).
A = ("cfc5d07f6f03c29bbf424132963fe08d19a37d5757aaf520bf08119f05cd56d6", 100)
B = ("c3e67584b5c4fc2a89837ec39e40f2c8a6bb0b2987ac94cd4b31e5fbdd210a72", 200)
C = ("0d2beb91b9196929a5ddec9f6e306924ddf4a24268e3e59fd8464738d525af37", 300)
D = ("adf8773496a9b7319b2e50dc98093f344053b17d8ad37100b9c07d9805988784", 400)
Z = ("0" * 64, 0)
ZERO = "0" * 64
VECTORS = [
    ([], ZERO, [(ZERO, ZERO)]),
    ([Z], ZERO, [(ZERO, "638a6bc391964a85939d48f008e8bdbae6a7975e7ca2d87a3ce2492f4e4d8a4c")]),
    ([A], A[0], [(ZERO, "8e16257caa3fe079d484d872a8975264b2ff683b0d6db9028cc7c0f968a45661")]),
    (
        [A, B, C],
        "71ec1275fca074724e2dd666921b3277c7cee603e4d025bcab2d4050015be2bc",
        [
            (ZERO, "54e55dccc6653c612bdb5576c5d3cb34bb31bc4e100248abccf4c908b3ef7715"),
            (
                "b286606709ef32a1cfede1e603a39f83fef56772d8234c0e35d8920071d80b69",
                "337f1f046e4cfc1057f0f3edbd87cf977fdfaf3c2b0c0031ca2d1d2a34aa2270",
            ),
        ],
    ),
    (
        [A, B, A, B, C, D],
        "52c826f99507aa05d0b45e9837fa1709e0485425cfbcb1e80db3905cf98b3ee9",
        [
            (ZERO, "91d21684db364c8883ab8209fa5eb2e781cf07f37e1fa43e731c30839afe422f"),
            (
                "fceabc1f6c6aaaa176bc53b2d6899a3ab99eaebd13b5f0cf36080e6f894bbbf5",
                "b70b051189a20b58d0c832111e0470396094518b6af8bd8c813c9ccb764ab602",
            ),
        ],
    ),
    ([A, A, A, A], "89f2ada89ff8c96763c6b25010e6dd76a4c05b1466207633ea559acf2093211b", []),
    ([Z, A, Z, A, Z], "f36c6a6374a567efd36ed087aeb680b57e3af4e0b5b8e7be2593df4cb647a2de", []),
    ([A, Z], "e8660f81494ca836a58e395c1395ef97870ed71e2b113eec1fab6b3361f46dd6", []),
]


@pytest.mark.parametrize(("chunks", "xorb", "files"), VECTORS)
def test_aggregated_hashes_match_xet_core_vectors(chunks, xorb, files):
    pairs = [(hex_to_hash(h), size) for h, size in chunks]
    assert hash_to_hex(merkle_hash(pairs)) == xorb
    for salt, expected in files:
        assert hash_to_hex(file_hash(pairs, hex_to_hash(salt))) == expected


def test_hash_string_convention_reverses_each_word():
    raw = bytes(range(32))
    text = hash_to_hex(raw)
    assert text[:16] == "0706050403020100" and text[48:] == "1f1e1d1c1b1a1918"
    assert hex_to_hash(text) == raw
    # The dedupe rule reads the last word as a little-endian u64: its hex string ends in 000.
    assert is_global_dedupe_chunk(hex_to_hash("ab" * 30 + "a000")) and not is_global_dedupe_chunk(raw)


@pytest.mark.parametrize("bad", ["", "a" * 63, "A" * 64, "g" * 64, "../" + "a" * 61, "a" * 65])
def test_hash_strings_are_validated(bad):
    with pytest.raises(XetError) as e:
        check_hash(bad)
    assert e.value.code == "InvalidHash"


@pytest.mark.parametrize("size", [0, 1, 3000, 8191])
def test_single_chunk_file_hash_matches_hf_xet(tmp_path, size):
    """hf_xet.hash_files is an independent oracle: a file under the minimum chunk size is one chunk."""
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    (info,) = hf_xet.hash_files([str(path)])
    expected = file_hash([(chunk_hash(data), size)]) if size else bytes(32)
    assert info.hash == hash_to_hex(expected)


def _chunks() -> list[bytes]:
    floats = b"".join(int(i * 2654435761 % 1000).to_bytes(4, "little") for i in range(4096))
    return [os.urandom(2000) + b"a" * 6000, floats, b"", os.urandom(13), b"\x00" * 65536]


@pytest.mark.parametrize("scheme", [SCHEME_NONE, SCHEME_LZ4, SCHEME_BG4_LZ4])
@pytest.mark.parametrize("footer", [True, False])
def test_xorb_round_trip_every_scheme(scheme, footer):
    chunks = _chunks()
    name, data = build_xorb(chunks, scheme, footer=footer)
    xorb = parse_xorb(data)
    assert hash_to_hex(xorb.hash) == name and xorb.has_footer == footer
    assert [c.size for c in xorb.chunks] == [len(c) for c in chunks]
    assert [c.hash for c in xorb.chunks] == [chunk_hash(c) for c in chunks]
    if scheme != SCHEME_NONE:
        assert len(data) < sum(len(c) for c in chunks)
    if footer:
        info = parse_xorb_footer(data[xorb.chunks[-1].end : -4])
        assert info["boundaries"] == [c.end for c in xorb.chunks]


def _corrupt(data: bytes, what: str) -> bytes:
    xorb = parse_xorb(data)
    second = xorb.chunks[1]
    if what == "flip":
        i = second.start + 20
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    if what == "truncate":
        return data[: second.end - 5]
    if what == "scheme":
        return data[: second.start + 4] + b"\x07" + data[second.start + 5 :]
    if what == "size":  # uncompressed size one byte larger than the data
        size = (second.size + 1).to_bytes(3, "little")
        return data[: second.start + 5] + size + data[second.start + 8 :]
    if what == "version":
        return data[: second.start] + b"\x01" + data[second.start + 1 :]
    if what == "footer":  # a footer whose chunk hash list is wrong
        info_start = xorb.chunks[-1].end
        i = info_start + 60
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["flip", "truncate", "scheme", "size", "version", "footer"])
def test_corrupted_xorbs_are_refused(what):
    name, data = build_xorb(_chunks(), SCHEME_LZ4)
    bad = _corrupt(data, what)
    try:
        xorb = parse_xorb(bad)
    except XetError as e:
        assert e.code == "XorbInvalid" and "Re-upload" in e.message
    else:  # a flipped byte in an LZ4 literal can still decompress: then the hash tells
        assert what == "flip" and hash_to_hex(xorb.hash) != name


def test_empty_xorb_is_refused():
    with pytest.raises(XetError, match="no chunk"):
        parse_xorb(b"")


def _shard_parts():
    chunks = _chunks()
    name, _ = build_xorb(chunks)
    hashes = [chunk_hash(c) for c in chunks]
    offsets = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    xorb = ShardXorb(
        hex_to_hash(name),
        tuple(ShardChunk(h, o, len(c), 0) for h, o, c in zip(hashes, offsets, chunks, strict=True)),
        1234,
    )
    sha = hashlib.sha256(b"".join(chunks)).digest()
    seg = Segment(hex_to_hash(name), sum(len(c) for c in chunks), 0, len(chunks))
    f = ShardFile(
        file_hash([(h, len(c)) for h, c in zip(hashes, chunks, strict=True)]),
        (seg,),
        (bytes(range(32)),),
        sha,
    )
    return f, xorb


def test_shard_round_trip():
    f, xorb = _shard_parts()
    key = os.urandom(32)
    data = build_shard([f], [xorb], hmac_key=key, expiry=99)
    shard = parse_shard(data)
    assert shard.files == (f,) and shard.xorbs == (xorb,) and shard.hmac_key == key
    assert shard.files[0].size == sum(len(c) for c in _chunks())
    bare = ShardFile(f.file_hash, f.segments, None, None)
    assert parse_shard(build_shard([bare], [])).files == (bare,)


@pytest.mark.parametrize("cut", [10, 60, 150, -201])
def test_truncated_or_foreign_shards_are_refused(cut):
    f, xorb = _shard_parts()
    data = build_shard([f], [xorb])
    with pytest.raises(XetError) as e:
        parse_shard(data[:cut])
    assert e.value.code == "ShardInvalid"
    with pytest.raises(XetError, match="magic"):
        parse_shard(b"x" * len(data))
