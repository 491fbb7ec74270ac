"""LFS uploads (HF_HUB_DISABLE_XET=1), upload size limits and LFS input checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from serve_support import answer_to_a_slow_body

TOKEN = "limits-token-0123456789"
THRESHOLD = 64 * 1024
MAX_UPLOAD = 1024 * 1024


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A registry with a 64 KiB LFS threshold and a 1 MiB upload limit."""
    from adapterkit_registry import RegistryServer

    root = tmp_path_factory.mktemp("small")
    with RegistryServer(
        root, tokens={TOKEN: ("erin", "write")}, lfs_threshold_mb=THRESHOLD / 2**20, max_upload_mb=1
    ) as srv:
        yield srv


def _name() -> str:
    return f"erin/l-{uuid.uuid4().hex[:8]}"


LFS_CLIENT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from huggingface_hub import HfApi, hf_hub_download
    repo_id, folder = sys.argv[1], Path(sys.argv[2])
    api = HfApi()
    api.create_repo(repo_id)
    first = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="lfs").oid
    again = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="noop").oid
    single = api.upload_file(path_or_fileobj=folder / "big.bin", path_in_repo="copy/big.bin", repo_id=repo_id).oid
    path = hf_hub_download(repo_id, "big.bin", revision=first)
    print(json.dumps({"first": first, "again": again, "single": single, "path": path}))
    """
)


def test_lfs_upload_with_xet_disabled(small, tmp_path):
    repo_id = _name()
    src = tmp_path / "src"
    src.mkdir()
    big, tiny = os.urandom(THRESHOLD * 3), b"small file"
    (src / "big.bin").write_bytes(big)
    (src / "tiny.txt").write_bytes(tiny)
    env = {
        **os.environ,
        "HF_ENDPOINT": small.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", LFS_CLIENT, repo_id, str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["again"] == out["first"]  # identical LFS content: no new commit
    assert Path(out["path"]).read_bytes() == big

    api = HfApi(endpoint=small.url, token=TOKEN)
    info = {f.path: f for f in api.get_paths_info(repo_id, ["big.bin", "tiny.txt", "copy/big.bin"])}
    assert info["big.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest() and info["big.bin"].lfs.size == len(
        big
    )
    assert info["copy/big.bin"].lfs is not None and info["tiny.txt"].lfs is None
    url = f"{small.url}/{repo_id}/resolve/main/big.bin"
    head = httpx2.head(url)
    assert head.headers["etag"].strip('"') == hashlib.sha256(big).hexdigest()
    assert head.headers["x-linked-size"] == str(len(big)) and head.headers["x-repo-commit"] == out["single"]
    path = hf_hub_download(repo_id, "copy/big.bin", endpoint=small.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == big


def _bearer() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def test_oversized_uploads_get_413_and_write_nothing(small):
    api = HfApi(endpoint=small.url, token=TOKEN)
    repo_id = api.create_repo(_name()).repo_id
    objects = set((small.root / "objects").rglob("*"))
    with pytest.raises(HfHubHTTPError, match="max-upload-mb") as e:  # refused at preupload
        api.upload_file(path_or_fileobj=os.urandom(MAX_UPLOAD + 1), path_in_repo="huge.bin", repo_id=repo_id)
    assert e.value.response.status_code == 413
    # A raw commit body over the limit is refused while streaming; nothing is stored.
    content = base64.b64encode(os.urandom(MAX_UPLOAD * 2)).decode()
    lines = [
        {"key": "header", "value": {"summary": "big"}},
        {"key": "file", "value": {"path": "x", "content": content}},
    ]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    r = httpx2.post(f"{small.url}/api/models/{repo_id}/commit/main", content=body, headers=_bearer())
    assert r.status_code == 413 and r.headers["x-error-code"] == "PayloadTooLarge"
    batch = {"operation": "upload", "objects": [{"oid": "a" * 64, "size": MAX_UPLOAD + 1}]}
    r = httpx2.post(f"{small.url}/{repo_id}.git/info/lfs/objects/batch", json=batch, headers=_bearer())
    assert r.status_code == 413
    assert set((small.root / "objects").rglob("*")) == objects
    assert api.list_repo_files(repo_id) == [] and len(api.list_repo_commits(repo_id)) == 1


def test_lfs_uploads_are_checked(small):
    api = HfApi(endpoint=small.url, token=TOKEN)
    repo_id = api.create_repo(_name()).repo_id
    data = os.urandom(THRESHOLD + 10)
    oid = hashlib.sha256(data).hexdigest()
    batch = {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}
    r = httpx2.post(f"{small.url}/{repo_id}.git/info/lfs/objects/batch", json=batch, headers=_bearer())
    actions = r.json()["objects"][0]["actions"]
    href = actions["upload"]["href"]
    assert httpx2.put(href.replace("sig=", "sig=0"), content=data).status_code == 403  # tampered signature
    wrong = data[:-1] + bytes([data[-1] ^ 1])  # (a fixed last byte would match 1 time in 256)
    bad = httpx2.put(href, content=wrong)
    assert bad.status_code == 400 and bad.headers["x-error-code"] == "LfsObjectMismatch"
    # Committing an object that never arrived is refused.
    line = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}}
    body = json.dumps({"key": "header", "value": {"summary": "s"}}) + "\n" + json.dumps(line) + "\n"
    r = httpx2.post(f"{small.url}/api/models/{repo_id}/commit/main", content=body, headers=_bearer())
    assert r.status_code == 400 and r.headers["x-error-code"] == "LfsObjectMissing"
    assert httpx2.put(href, content=data).status_code == 200  # no Authorization header: the URL is signed
    assert httpx2.post(
        actions["verify"]["href"], json={"oid": oid, "size": len(data)}, headers=_bearer()
    ).is_success
    r = httpx2.post(f"{small.url}/api/models/{repo_id}/commit/main", content=body, headers=_bearer())
    assert r.status_code == 200, r.text
    assert (
        hf_hub_download(repo_id, "w.bin", endpoint=small.url)
        and api.get_paths_info(repo_id, ["w.bin"])[0].lfs
    )
    # Another repo cannot reference this object without uploading it.
    other = api.create_repo(_name()).repo_id
    r = httpx2.post(f"{small.url}/api/models/{other}/commit/main", content=body, headers=_bearer())
    assert r.status_code == 400 and r.headers["x-error-code"] == "LfsObjectMissing"


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_a_stalled_or_trickled_body_ends_with_408_and_frees_its_connection(tmp_path, trickle):
    """A client that stops sending its body, or sends a byte just before each idle limit (slow-loris),
    holds nothing for long: 408, the connection closed, nothing written."""
    from adapterkit_registry import RegistryServer, Storage, fsck

    with RegistryServer(tmp_path / "root", tokens={TOKEN: ("erin", "write")}, body_timeout_s=1) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        api.create_repo("erin/stall")
        host, port = srv.url.removeprefix("http://").split(":")
        head = (
            "POST /api/models/erin/stall/commit/main HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/x-ndjson\r\nContent-Length: 1000\r\n\r\n"
        )
        answer = answer_to_a_slow_body(host, int(port), head.encode() + b'{"key": "header"', trickle)
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 408") and b"RequestTimeout" in rest, answer[:300]
        assert b"body-timeout" in rest
        assert api.model_info("erin/stall").sha == api.list_repo_commits("erin/stall")[0].commit_id
        assert [f for f in api.list_repo_files("erin/stall") if f != ".gitattributes"] == []
        assert fsck(Storage(srv.root, create=False), deep=False) == []


def test_a_missing_blob_is_a_500_before_any_byte_not_a_dropped_download(tmp_path):
    from adapterkit_registry import RegistryServer, Storage

    with RegistryServer(tmp_path / "root", tokens={TOKEN: ("erin", "write")}) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        api.create_repo("erin/lost")
        api.upload_file(path_or_fileobj=b"x" * 5000, path_in_repo="f.bin", repo_id="erin/lost")
        sha = hashlib.sha256(b"x" * 5000).hexdigest()
        Storage(srv.root, create=False).blobs.path(
            sha
        ).unlink()  # as a damaged disk or a bad restore leaves it
        r = httpx2.get(f"{srv.url}/erin/lost/resolve/main/f.bin")
        assert (r.status_code, r.headers["x-error-code"]) == (500, "BlobMissing") and "fsck" in r.json()[
            "error"
        ]
        assert httpx2.get(f"{srv.url}/healthz").status_code == 200
