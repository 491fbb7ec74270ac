"""Large inline files: decoded from the spooled body a chunk at a time, with the same checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import httpx2
import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from huggingface_hub import HfApi, hf_hub_download

TOKEN = "bodies-token-0123456789"
MIB = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("bodies")
    with RegistryServer(
        root, tokens={TOKEN: ("alice", "write")}, lfs_threshold_mb=6, max_upload_mb=16
    ) as server:
        HfApi(endpoint=server.url, token=TOKEN).create_repo("alice/big")
        yield server


def _post(srv, lines: list) -> httpx2.Response:
    body = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/x-ndjson"}
    return httpx2.post(
        f"{srv.url}/api/models/alice/big/commit/main", content=body, headers=headers, timeout=120
    )


HEADER = {"key": "header", "value": {"summary": "s"}}


def _file(path: str, content: str, **extra) -> dict:
    return {"key": "file", "value": {"path": path, "content": content, "encoding": "base64", **extra}}


def test_large_inline_files_round_trip(srv, tmp_path):
    api = HfApi(endpoint=srv.url, token=TOKEN)
    data = os.urandom(3 * MIB + 5)
    api.upload_file(path_or_fileobj=data, path_in_repo="d/three.bin", repo_id="alice/big")
    two = [os.urandom(2 * MIB + i) for i in range(2)]
    r = _post(srv, [HEADER, *(_file(f"two{i}.bin", base64.b64encode(d).decode()) for i, d in enumerate(two))])
    assert r.status_code == 200, r.text
    for path, expected in [("d/three.bin", data), ("two0.bin", two[0]), ("two1.bin", two[1])]:
        got = Path(
            hf_hub_download("alice/big", path, endpoint=srv.url, cache_dir=tmp_path / "c")
        ).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    info = {f.path: f for f in api.get_paths_info("alice/big", ["d/three.bin"])}
    assert info["d/three.bin"].size == len(data) and info["d/three.bin"].lfs is None


CONTENT = base64.b64encode(os.urandom(2 * MIB)).decode()


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (
            [
                {"key": "header", "value": {"summary": "s", "description": "x" * (2 * MIB)}},
                _file("a", "eA=="),
            ],
            400,
        ),
        ([HEADER, _file("a", CONTENT[:1000] + "\\/" + CONTENT[1002:])], 400),
        ([HEADER, _file("a", CONTENT[:1000] + "====" + CONTENT[1004:])], 400),
        ([HEADER, _file("a", CONTENT[:-1])], 400),
        ([HEADER, _file("a", CONTENT[:1000] + "!!!!" + CONTENT[1004:])], 400),
        ([HEADER, _file("a", CONTENT, note="y" * (2 * MIB))], 400),
        ([HEADER, {"key": "lfsFile", "value": {"path": "a", "oid": CONTENT}}], 400),
        ([HEADER, _file("../a", CONTENT)], 400),
        ([HEADER, _file("a", base64.b64encode(os.urandom(7 * MIB)).decode())], 413),
        ([HEADER, b'{"key": "file", "value": {"path": "a", "content": "' + b"A" * (2 * MIB)], 400),
    ],
    ids=[
        "long-description",
        "escape",
        "inner-padding",
        "truncated",
        "bad-chars",
        "two-long-strings",
        "long-oid",
        "bad-path",
        "above-threshold",
        "unterminated",
    ],
)
def test_bad_large_lines(srv, lines, status):
    before = {p.name for p in Storage(srv.root, create=False).blobs.all()}
    r = _post(srv, lines)
    assert r.status_code == status, r.text[:300]
    assert r.headers["x-error-code"] in ("BadRequest", "InvalidPath", "PayloadTooLarge")
    assert {p.name for p in Storage(srv.root, create=False).blobs.all()} == before  # nothing stored
    assert fsck(Storage(srv.root, create=False), deep=False) == []
