"""The Xet store with real hf_xet traffic (a loopback CAS server around the store) and hostile input."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import hf_xet
import pytest
import uvicorn
from adapterkit_registry.xet_format import (
    XetError,
    chunk_hash,
    file_hash,
    hash_to_hex,
    hex_to_hash,
    keyed_hash,
    parse_xorb,
    read_chunk,
)
from adapterkit_registry.xet_shard import Segment, ShardFile, ShardXorb, build_shard, parse_shard
from adapterkit_registry.xet_store import XetStore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from xet_support import CHUNKS, shard_file, xorb_parts

STATUS = {"RangeNotSatisfiable": 416, "FileNotFound": 404, "XorbMissing": 404}


def _cas_app(store: XetStore, log: list, v2: bool) -> Starlette:
    """The CAS routes hf_xet 1.8.0 calls, answered by the store; `log` records what was received."""

    def byte_range(request: Request) -> tuple[int, int] | None:
        value = request.headers.get("range")
        if not value:
            return None
        start, end = value.removeprefix("bytes=").split("-")
        return int(start), int(end) + 1

    def call(fn, *args) -> Response:
        try:
            return JSONResponse(fn(*args))
        except XetError as e:
            return JSONResponse(
                {"error": e.message}, STATUS.get(e.code, 400), headers={"X-Error-Code": e.code}
            )

    async def chunk(request: Request) -> Response:
        log.append(("chunk", 0))
        body = store.dedupe_shard(request.path_params["h"])
        return Response(body) if body else Response(status_code=404)

    async def xorb_post(request: Request) -> Response:
        body = await request.body()
        log.append(("xorb", len(body)))
        return call(lambda: {"was_inserted": store.put_xorb(request.path_params["h"], body)})

    async def shard_post(request: Request) -> Response:
        body = await request.body()
        log.append(("shard", len(body)))
        return call(lambda: {"result": len(store.put_shard(body)) and 1})

    async def reconstruction(request: Request) -> Response:
        version = request.path_params["v"]
        log.append((version, 0))
        if version == "v2" and not v2:
            return Response(status_code=404)
        method = store.reconstruction_v2 if version == "v2" else store.reconstruction
        base = str(request.base_url)
        return call(method, request.path_params["h"], byte_range(request), lambda x: f"{base}xorb/{x}")

    async def xorb_get(request: Request) -> Response:
        start, end = byte_range(request)
        with open(store.xorb_path(request.path_params["h"]), "rb") as f:
            f.seek(start)
            return Response(f.read(end - start), 206)

    async def not_here(request: Request) -> Response:
        return Response(status_code=404)  # xorb grants, /v2/shards: the client falls back

    routes = [
        Route("/v1/chunks/{prefix}/{h}", chunk),
        Route("/v1/xorbs/{prefix}/{h}", xorb_post, methods=["POST"]),
        Route("/v1/shards", shard_post, methods=["POST"]),
        Route("/{v}/reconstructions/{h}", reconstruction),
        Route("/xorb/{h}", xorb_get),
        Route("/{rest:path}", not_here, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes)


@pytest.fixture
def cas(tmp_path, monkeypatch, request):
    """A loopback CAS server around a fresh store: (store, url, log)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    store, log = XetStore(tmp_path / "xet"), []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = _cas_app(store, log, v2=getattr(request, "param", True))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield store, f"http://127.0.0.1:{port}", log
    server.should_exit = True
    thread.join(10)


def _auth(url: str) -> dict:
    return {"endpoint": url, "token": "t", "token_expiry_unix_secs": int(time.time()) + 3600}


def _upload(url: str, path: Path) -> str:
    """Upload one file with hf_xet (a fresh session); return its Xet hash."""
    commit = hf_xet.XetSession().new_upload_commit(**_auth(url))
    commit.start_upload_file(str(path))
    (meta,) = commit.wait_to_finish().uploads.values()
    return meta.xet_info.hash


def _data(seed: int = 0) -> bytes:
    rng = hashlib.sha256(str(seed).encode()).digest()
    random = b"".join(hashlib.sha256(rng + i.to_bytes(4, "little")).digest() for i in range(60_000))
    return random + bytes(700_000) + b"abcdefgh" * 50_000


@pytest.mark.parametrize("cas", [True, False], ids=["v2", "v1"], indirect=True)
def test_hf_xet_upload_and_download_round_trip(cas, tmp_path, request):
    store, url, log = cas
    data = _data()
    (tmp_path / "f.bin").write_bytes(data)
    name = _upload(url, tmp_path / "f.bin")
    assert store.file(name).size == len(data)
    assert store.file(name).sha256 == hashlib.sha256(data).hexdigest()
    assert store.file_by_sha256(hashlib.sha256(data).hexdigest()).file_hash == name
    assert b"".join(store.read_file(name)) == data
    assert b"".join(store.read_file(name, 1_000_001, 2_500_000)) == data[1_000_001:2_500_000]
    group = hf_xet.XetSession().new_download_stream_group(**_auth(url))
    info = hf_xet.XetFileInfo(name, len(data))
    assert b"".join(group.download_stream(info)) == data
    assert b"".join(group.download_stream(info, start=123_457, end=2_345_678)) == data[123_457:2_345_678]
    assert (("v1", 0) in log) == (not request.node.callspec.params["cas"])  # the client fell back to v1
    assert store.fsck() == []
    assert store.stats()["files"] == 1


def test_second_upload_with_one_change_sends_a_small_fraction(cas, tmp_path, monkeypatch):
    """A fresh client (empty cache) finds the unchanged chunks through the global dedupe answer."""
    store, url, log = cas
    data = _data(1)
    (tmp_path / "a.bin").write_bytes(data)
    _upload(url, tmp_path / "a.bin")
    changed = bytearray(data)
    changed[1_000_000:1_000_100] = b"x" * 100
    (tmp_path / "b.bin").write_bytes(bytes(changed))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "other_home"))
    log.clear()
    name = _upload(url, tmp_path / "b.bin")
    received = sum(n for kind, n in log if kind in ("xorb", "shard"))
    assert ("chunk", 0) in log and received < len(data) / 10
    assert b"".join(store.read_file(name)) == bytes(changed)


def test_changed_file_in_a_third_family_sends_no_xorb(cas, tmp_path, monkeypatch):
    """A file, a changed version, the file again (another family), then the changed version again: each
    from a fresh client. The last finds every chunk through the dedupe answer of its first chunk, though
    the most recent shard indexing that chunk holds only the unchanged file."""
    store, url, log = cas
    data = _data(2)
    changed = bytearray(data)
    changed[1_000_000:1_000_100] = b"y" * 100
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(bytes(changed))
    for i, name in enumerate(["a.bin", "b.bin", "a.bin", "b.bin"]):
        monkeypatch.setenv("HF_HOME", str(tmp_path / f"home{i}"))
        log.clear()
        _upload(url, tmp_path / name)
    assert ("chunk", 0) in log and not [n for kind, n in log if kind == "xorb"]
    assert sum(n for kind, n in log if kind == "shard") < 4096


def test_put_xorb_refuses_bad_xorbs_and_writes_nothing(tmp_path):
    store = XetStore(tmp_path / "xet")
    name, data, _ = xorb_parts(CHUNKS)
    other, _, _ = xorb_parts(CHUNKS[1:])
    second = parse_xorb(data).chunks[1]
    flipped = bytearray(data)
    flipped[second.start + 8 + 2] ^= 0xFF
    bad_scheme = bytearray(data)
    bad_scheme[second.start + 4] = 9
    cases = [
        (other, data, "XorbHashMismatch"),
        (name, bytes(flipped), None),  # XorbInvalid or XorbHashMismatch, by where the byte lands
        (name, data[: second.end - 3], "XorbInvalid"),
        (name, bytes(bad_scheme), "XorbInvalid"),
        ("../" + name[3:], data, "InvalidHash"),
    ]
    for xorb_name, body, code in cases:
        with pytest.raises(XetError) as e:
            store.put_xorb(xorb_name, body)
        assert e.value.code in ({code} if code else {"XorbInvalid", "XorbHashMismatch"})
    assert store.stats()["xorbs"] == 0 and not any((tmp_path / "xet" / "tmp").iterdir())
    assert store.put_xorb(name, data) and not store.put_xorb(name, data)


def test_put_shard_refuses_bad_shards_and_registers_nothing(tmp_path):
    store = XetStore(tmp_path / "xet")
    name, data, cas_entry = xorb_parts(CHUNKS)
    missing, _, missing_entry = xorb_parts(CHUNKS[:3])
    store.put_xorb(name, data)
    good = shard_file(name, CHUNKS, 2, 7)
    wrong_hash = ShardFile(bytes(32 - 1) + b"\x01", good.segments, None, good.sha256)
    wrong_sha = ShardFile(good.file_hash, good.segments, None, hashlib.sha256(b"other").digest())
    wrong_verification = ShardFile(good.file_hash, good.segments, (bytes(32),), good.sha256)
    wrong_range = ShardFile(good.file_hash, (Segment(hex_to_hash(name), 5, 2, 7),), None, None)
    lying_cas = ShardXorb(cas_entry.hash, cas_entry.chunks[:-1], 0)
    cases = [
        ([shard_file(missing, CHUNKS[:3], 0, 2)], [], "XorbMissing"),
        ([good], [missing_entry], "XorbMissing"),
        ([good, wrong_hash], [], "FileHashMismatch"),
        ([wrong_sha], [], "FileHashMismatch"),
        ([wrong_verification], [], "FileHashMismatch"),
        ([wrong_range], [], "ShardInvalid"),
        ([good], [lying_cas], "ShardInvalid"),
    ]
    for files, xorbs, code in cases:
        with pytest.raises(XetError) as e:
            store.put_shard(build_shard(files, xorbs))
        assert e.value.code == code, e.value.message
    with pytest.raises(XetError, match="keyed"):
        store.put_shard(build_shard([good], [], hmac_key=b"k" * 32))
    assert store.file(hash_to_hex(good.file_hash)) is None
    assert store.stats()["files"] == 0 and store.stats()["shards"] == 0
    (registered,) = store.put_shard(build_shard([good], [cas_entry]))
    assert store.put_shard(build_shard([good], [cas_entry])) == [registered]
    assert registered.sha256 == hashlib.sha256(b"".join(CHUNKS[2:7])).hexdigest()
    no_sha = store.put_shard(build_shard([shard_file(name, CHUNKS, 0, 1, sha=False)], []))
    assert no_sha[0].sha256 == hashlib.sha256(CHUNKS[0]).hexdigest()


def _client_read(store: XetStore, answer: dict, length: int) -> bytes:
    """Decode a reconstruction answer the way the client does: fetch url_range, decode, skip, cut."""
    out = bytearray()
    for term in answer["terms"]:
        (info,) = [i for i in answer["fetch_info"][term["hash"]] if i["range"] == term["range"]]
        raw = store.xorb_path(term["hash"]).read_bytes()[
            info["url_range"]["start"] : info["url_range"]["end"] + 1
        ]
        view, pos, part = memoryview(raw), 0, bytearray()
        for _ in range(term["range"]["end"] - term["range"]["start"]):
            chunk, pos = read_chunk(view, pos)
            part += chunk
        assert len(part) == term["unpacked_length"] and pos == len(raw)
        out += part
    return bytes(out[answer["offset_into_first_range"] :][:length])


def test_reconstruction_of_byte_ranges(tmp_path):
    store = XetStore(tmp_path / "xet")
    first, data1, _ = xorb_parts(CHUNKS[:6])
    second, data2, _ = xorb_parts(CHUNKS[6:])
    store.put_xorb(first, data1)
    store.put_xorb(second, data2)
    seg1 = Segment(hex_to_hash(first), sum(len(c) for c in CHUNKS[1:6]), 1, 6)
    seg2 = Segment(hex_to_hash(second), sum(len(c) for c in CHUNKS[6:9]), 0, 3)
    content = b"".join(CHUNKS[1:9])
    f = ShardFile(file_hash([(chunk_hash(c), len(c)) for c in CHUNKS[1:9]]), (seg1, seg2), None, None)
    (xf,) = store.put_shard(build_shard([f], []))
    size = len(content)
    for start, end in [
        (0, size),
        (0, 1),
        (6999, 7001),
        (7000, 14000),
        (20_000, 40_000),
        (size - 1, size + 50),
    ]:
        answer = store.reconstruction(xf.file_hash, (start, end), lambda x: f"http://h/xorb/{x}")
        assert _client_read(store, answer, min(end, size) - start) == content[start:end]
        assert b"".join(store.read_file(xf.file_hash, start, end)) == content[start:end]
        v2 = store.reconstruction_v2(xf.file_hash, (start, end), lambda x: f"http://h/xorb/{x}")
        assert v2["terms"] == answer["terms"] and set(v2["xorbs"]) == set(answer["fetch_info"])
    whole = store.reconstruction(xf.file_hash, None, str)
    assert [t["hash"] for t in whole["terms"]] == [first, second] and whole["offset_into_first_range"] == 0
    assert whole["fetch_info"][first][0]["url"] == first
    for bad in [(size, size + 1), (5, 5)]:
        with pytest.raises(XetError) as e:
            store.reconstruction(xf.file_hash, bad, str)
        assert e.value.code == "RangeNotSatisfiable"
    with pytest.raises(XetError) as e:
        store.reconstruction("ab" * 32, None, str)
    assert e.value.code == "FileNotFound"


def test_dedupe_answer_is_a_keyed_shard_the_parser_reads(tmp_path):
    store = XetStore(tmp_path / "xet")
    name, data, cas_entry = xorb_parts(CHUNKS)
    store.put_xorb(name, data)
    store.put_shard(build_shard([shard_file(name, CHUNKS, 3, 8)], [cas_entry]))
    assert store.dedupe_shard(hash_to_hex(chunk_hash(CHUNKS[4]))) is None  # not eligible: no answer
    answer = parse_shard(store.dedupe_shard(hash_to_hex(chunk_hash(CHUNKS[3]))))  # a file's first chunk
    (xorb,) = answer.xorbs
    assert answer.files == () and any(answer.hmac_key) and xorb.hash == hex_to_hash(name)
    assert [c.hash for c in xorb.chunks] == [keyed_hash(chunk_hash(c), answer.hmac_key) for c in CHUNKS]
    assert [c.size for c in xorb.chunks] == [len(c) for c in CHUNKS]


def test_fsck_finds_a_flipped_byte_on_disk(tmp_path):
    store = XetStore(tmp_path / "xet")
    name, data, cas_entry = xorb_parts(CHUNKS)
    store.put_xorb(name, data)
    (xf,) = store.put_shard(build_shard([shard_file(name, CHUNKS, 0, 12)], [cas_entry]))
    assert store.fsck() == []
    path = store.xorb_path(name)
    raw = bytearray(path.read_bytes())
    raw[parse_xorb(data).chunks[5].start + 9] ^= 0x01
    path.write_bytes(bytes(raw))
    problems = XetStore(tmp_path / "xet").fsck()
    assert len(problems) == 1 and name in problems[0]
    with pytest.raises(XetError) as e:
        b"".join(store.read_file(xf.file_hash))
    assert e.value.code in {"XorbCorrupt", "XorbInvalid"}
    path.unlink()
    assert any("missing" in p for p in XetStore(tmp_path / "xet").fsck())


CHILD = """
import sys
from pathlib import Path
from adapterkit_registry.xet_store import XetStore
XetStore(Path(sys.argv[1])).put_shard(Path(sys.argv[2]).read_bytes())
print("done", flush=True)
"""


@pytest.mark.parametrize("when", ["start", "journal", "apply"])
def test_sigkill_during_registration_leaves_all_or_none(tmp_path, when):
    """A shard of 78 files registered by a child SIGKILLed at once (nothing verified yet), as soon as its
    journal exists, or 30 ms into applying it: after a restart the store holds none or all of them."""
    root = tmp_path / "xet"
    store = XetStore(root)
    name, data, cas_entry = xorb_parts(CHUNKS)
    store.put_xorb(name, data)
    files = [shard_file(name, CHUNKS, lo, hi) for lo in range(12) for hi in range(lo + 1, 13)]
    shard = tmp_path / "shard.bin"
    shard.write_bytes(build_shard(files, [cas_entry]))
    names = {hash_to_hex(f.file_hash) for f in files}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(shard)], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while when != "start" and child.poll() is None and time.monotonic() < deadline:
        if any((root / "pending").iterdir()):
            time.sleep(0.03 if when == "apply" else 0)
            break
        time.sleep(0.0005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    registered = {n for n in names if XetStore(root).file(n)}  # a restart replays the journal
    assert registered == (set() if when == "start" else names)
    assert XetStore(root).fsck() == [] and not any((root / "pending").iterdir())
