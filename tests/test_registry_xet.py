"""Xet storage with the real `huggingface_hub` client and `hf_xet` over real HTTP on loopback: uploads,
downloads with and without Xet, privacy of the token endpoints and the CAS API, refused objects, fsck."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx2
import numpy as np
import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.auth import UrlSigner
from adapterkit_registry.xet_shard import ShardFile, build_shard
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from xet_support import CHUNKS, shard_file, xorb_parts

TOKENS = {"alice": "alice-xet-token-0123", "bob": "bob-xet-token-0123", "read": "alice-xet-read-0123"}


def rand(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def xsrv(tmp_path_factory):
    """A registry whose LFS threshold (50 KB) sends every test file above it through Xet."""
    users = {
        TOKENS["alice"]: ("alice", "write"),
        TOKENS["bob"]: ("bob", "write"),
        TOKENS["read"]: ("alice", "read"),
    }
    with RegistryServer(tmp_path_factory.mktemp("xet"), tokens=users, lfs_threshold_mb=0.05) as server:
        yield server


def api(srv, who: str = "alice") -> HfApi:
    return HfApi(endpoint=srv.url, token=TOKENS[who])


def received(srv) -> dict[str, int]:
    return srv.app.state.hub.xet_received()


def cas_token(srv, repo: str, kind: str, who: str | None) -> httpx2.Response:
    headers = {"authorization": f"Bearer {TOKENS[who]}"} if who else {}
    return httpx2.get(f"{srv.url}/api/models/{repo}/xet-{kind}-token/main", headers=headers)


def test_upload_file_then_download_with_and_without_xet(xsrv, tmp_path, monkeypatch):
    repo = api(xsrv).create_repo(unique("file")).repo_id
    data = rand(300_000, 1)
    before = received(xsrv)
    api(xsrv).upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=repo)
    after = received(xsrv)
    assert after["xorbs"] > before["xorbs"] and after["shards"] > before["shards"]  # it went through Xet
    head = httpx2.head(f"{xsrv.url}/{repo}/resolve/main/w.safetensors")
    sha = hashlib.sha256(data).hexdigest()
    assert head.headers["etag"] == f'"{sha}"' and len(head.headers["x-xet-hash"]) == 64
    assert 'rel="xet-auth"' in head.headers["link"]
    tree = api(xsrv).list_repo_tree(repo)
    assert [e.xet_hash for e in tree] == [head.headers["x-xet-hash"]]
    got = hf_hub_download(repo, "w.safetensors", endpoint=xsrv.url, cache_dir=tmp_path / "xet")
    assert Path(got).read_bytes() == data
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # a client without Xet: plain bytes
    got = hf_hub_download(repo, "w.safetensors", endpoint=xsrv.url, cache_dir=tmp_path / "plain")
    assert Path(got).read_bytes() == data
    part = httpx2.get(f"{xsrv.url}/{repo}/resolve/main/w.safetensors", headers={"range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]


def test_upload_folder_and_snapshot_download(xsrv, tmp_path):
    folder = tmp_path / "fam"
    files = {"a.safetensors": rand(120_000, 2), "sub/b.bin": rand(200_000, 3), "c.json": b"{}"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    repo = api(xsrv).create_repo(unique("folder")).repo_id
    api(xsrv).upload_folder(folder_path=folder, repo_id=repo)
    snap = Path(snapshot_download(repo, endpoint=xsrv.url, cache_dir=tmp_path / "cache"))
    assert {n: (snap / n).read_bytes() for n in files} == files
    xet = {e.path: e.xet_hash for e in api(xsrv).list_repo_tree(repo, recursive=True) if e.path in files}
    assert xet["c.json"] is None and xet["a.safetensors"] and xet["sub/b.bin"]


def test_hf_upload_cli(xsrv, tmp_path):
    repo = api(xsrv).create_repo(unique("cli")).repo_id
    data = rand(150_000, 4)
    (tmp_path / "big.bin").write_bytes(data)
    env = {
        **os.environ,
        "HF_ENDPOINT": xsrv.url,
        "HF_TOKEN": TOKENS["alice"],
        "HF_HOME": str(tmp_path / "hf"),
    }
    env.pop("HF_HUB_DISABLE_XET", None)
    hf = Path(sys.executable).with_name("hf")
    out = subprocess.run(
        [str(hf), "upload", repo, str(tmp_path / "big.bin"), "big.bin"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = hf_hub_download(repo, "big.bin", endpoint=xsrv.url, cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == data


def test_large_file_round_trip_is_bit_identical(xsrv, tmp_path):
    data = rand(64 * 1024 * 1024 + 12345, 5)
    (tmp_path / "big.safetensors").write_bytes(data)
    repo = api(xsrv).create_repo(unique("large")).repo_id
    api(xsrv).upload_file(
        path_or_fileobj=tmp_path / "big.safetensors", path_in_repo="big.safetensors", repo_id=repo
    )
    got = hf_hub_download(repo, "big.safetensors", endpoint=xsrv.url, cache_dir=tmp_path / "dl")
    assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    tail = httpx2.get(f"{xsrv.url}/{repo}/resolve/main/big.safetensors", headers={"range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == data[-100:]


def test_private_repo_xet_refuses_anonymous_and_other_users(xsrv, tmp_path):
    name = unique("private")
    repo = api(xsrv).create_repo(name, private=True).repo_id
    data = rand(100_000, 6)
    api(xsrv).upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=repo)
    for who in (None, "bob"):
        for kind in ("read", "write"):
            r = cas_token(xsrv, repo, kind, who)
            assert (r.status_code, r.headers["x-error-code"]) == (404, "RepoNotFound")
    assert cas_token(xsrv, repo, "write", "read").status_code == 403
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo, "w.bin", endpoint=xsrv.url, token=TOKENS["bob"], cache_dir=tmp_path / "bob")

    # alice's read token reads it through reconstruction; bob's CAS token (his own repo) cannot
    file_hash = httpx2.head(
        f"{xsrv.url}/{repo}/resolve/main/w.bin", headers={"authorization": f"Bearer {TOKENS['read']}"}
    ).headers["x-xet-hash"]
    mine = cas_token(xsrv, repo, "read", "read").json()
    recon = httpx2.get(
        f"{mine['casUrl']}/v1/reconstructions/{file_hash}",
        headers={"authorization": f"Bearer {mine['accessToken']}"},
    )
    assert recon.status_code == 200
    bob_repo = api(xsrv, "bob").create_repo(unique("bobs")).repo_id
    theirs = cas_token(xsrv, bob_repo, "write", "bob").json()["accessToken"]
    r = httpx2.get(
        f"{xsrv.url}/v1/reconstructions/{file_hash}", headers={"authorization": f"Bearer {theirs}"}
    )
    assert (r.status_code, r.headers["x-error-code"]) == (404, "XetFileNotFound")

    # a read CAS token cannot upload; xorb URLs are signed and expire
    r = httpx2.post(
        f"{xsrv.url}/v1/shards", content=b"x", headers={"authorization": f"Bearer {mine['accessToken']}"}
    )
    assert (r.status_code, r.headers["x-error-code"]) == (403, "Forbidden")
    xorb, fetch = next(iter(recon.json()["fetch_info"].items()))
    rng = {"range": f"bytes={fetch[0]['url_range']['start']}-{fetch[0]['url_range']['end']}"}
    assert httpx2.get(fetch[0]["url"], headers=rng).status_code == 206
    assert httpx2.get(fetch[0]["url"].replace("sig=", "sig=0"), headers=rng).status_code == 403
    past = str(int(time.time()) - 10)
    sig = UrlSigner(xsrv.root).sign("xorb", xorb, past)
    expired = httpx2.get(f"{xsrv.url}/v1/xorbs/default/{xorb}?exp={past}&sig={sig}", headers=rng)
    assert (expired.status_code, expired.headers["x-error-code"]) == (403, "ExpiredSignature")


def test_revoked_hub_token_ends_its_cas_token(xsrv):
    hub = xsrv.app.state.hub
    token = hub.tokens.create("carol", "write")
    repo = HfApi(endpoint=xsrv.url, token=token).create_repo(unique("carol")).repo_id
    cas = httpx2.get(
        f"{xsrv.url}/api/models/{repo}/xet-write-token/main", headers={"authorization": f"Bearer {token}"}
    ).json()["accessToken"]
    url, auth = f"{xsrv.url}/v1/chunks/default-merkledb/{'a' * 64}", {"authorization": f"Bearer {cas}"}
    assert httpx2.get(url, headers=auth).status_code == 404  # valid token, unknown chunk
    hub.tokens.revoke(hub.tokens.authenticate(token).token_id)
    r = httpx2.get(url, headers=auth)
    assert (r.status_code, r.headers["x-error-code"]) == (401, "InvalidXetToken")


def test_corrupted_xorb_is_refused_and_fsck_sees_a_damaged_one(xsrv, tmp_path):
    repo = api(xsrv).create_repo(unique("corrupt")).repo_id
    api(xsrv).upload_file(path_or_fileobj=rand(90_000, 7), path_in_repo="w.bin", repo_id=repo)
    file_hash = httpx2.head(f"{xsrv.url}/{repo}/resolve/main/w.bin").headers["x-xet-hash"]
    store = xsrv.app.state.hub.xet
    xorb = store.reconstruction(file_hash, None, lambda h: h)["terms"][0]["hash"]
    good = store.xorb_path(xorb).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF

    users = {TOKENS["alice"]: ("alice", "write")}
    with RegistryServer(tmp_path / "fresh", tokens=users, lfs_threshold_mb=0.05) as fresh:
        fresh_repo = api(fresh).create_repo("r").repo_id
        cas = cas_token(fresh, fresh_repo, "write", "alice").json()["accessToken"]
        auth = {"authorization": f"Bearer {cas}"}
        r = httpx2.post(f"{fresh.url}/v1/xorbs/default/{xorb}", content=bytes(bad), headers=auth)
        assert r.status_code == 400 and r.headers["x-error-code"].startswith("Xorb"), r.text
        assert not fresh.app.state.hub.xet.has_xorb(xorb)
        other = "0" * 63 + "1"  # the intact bytes under another name: refused too
        r = httpx2.post(f"{fresh.url}/v1/xorbs/default/{other}", content=good, headers=auth)
        assert (r.status_code, r.headers["x-error-code"]) == (400, "XorbHashMismatch")
        r = httpx2.post(f"{fresh.url}/v1/xorbs/default/{xorb}", content=good, headers=auth)
        assert r.json() == {"was_inserted": True}
        assert httpx2.post(f"{fresh.url}/v1/xorbs/default/{xorb}", content=good, headers=auth).json() == {
            "was_inserted": False
        }
        assert fsck(Storage(fresh.root, create=False)) == []
        path = fresh.app.state.hub.xet.xorb_path(xorb)
        path.write_bytes(bytes(bad))
        assert any(xorb in p for p in fsck(Storage(fresh.root, create=False)))


def test_fsck_beside_a_live_server_changes_nothing(tmp_path, capsys):
    """`adapterkit-registry fsck` opens the Xet store read-only: a pending shard journal and a stale
    temporary file stay for the server (the journal is reported, not a problem); a restart applies it."""
    from adapterkit_registry.cli import main

    users = {TOKENS["alice"]: ("alice", "write")}
    with RegistryServer(tmp_path / "live", tokens=users, lfs_threshold_mb=0.05) as live:
        repo = api(live).create_repo("r").repo_id
        api(live).upload_file(path_or_fileobj=rand(90_000, 9), path_in_repo="w.bin", repo_id=repo)
        xet = live.root / "xet"
        journal = xet / "pending" / f"{'cd' * 32}.json"
        journal.write_text('{"shard": "' + "cd" * 32 + '", "xorbs": [], "files": [], "chunks": []}')
        stale = xet / "tmp" / "w-stale"
        stale.write_bytes(b"x")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        assert main(["fsck", "--root", str(live.root)]) == 0
        out = capsys.readouterr().out
        assert "pending, applied at next server start" in out and "ok" in out, out
        assert journal.exists() and stale.exists()
    with RegistryServer(tmp_path / "live", tokens=users, lfs_threshold_mb=0.05):
        assert not journal.exists() and not stale.exists()


def test_shard_upload_keeps_the_plain_bytes_only_when_verified(tmp_path):
    """A shard whose SHA-256 lies is refused and leaves no temporary blob; the honest one leaves the
    plain bytes in the blob store, written during the store's SHA-256 pass, and nothing in tmp/."""
    users = {TOKENS["alice"]: ("alice", "write")}
    with RegistryServer(tmp_path / "plain", tokens=users, lfs_threshold_mb=0.05) as srv:
        repo = api(srv).create_repo("r").repo_id
        cas = cas_token(srv, repo, "write", "alice").json()["accessToken"]
        auth = {"authorization": f"Bearer {cas}"}
        name, data, entry = xorb_parts(CHUNKS)
        assert (
            httpx2.post(f"{srv.url}/v1/xorbs/default/{name}", content=data, headers=auth).status_code == 200
        )
        good = shard_file(name, CHUNKS, 1, 9)
        lying = ShardFile(good.file_hash, good.segments, None, hashlib.sha256(b"other").digest())
        r = httpx2.post(f"{srv.url}/v1/shards", content=build_shard([lying], [entry]), headers=auth)
        assert (r.status_code, r.headers["x-error-code"]) == (400, "FileHashMismatch")
        sha = hashlib.sha256(b"".join(CHUNKS[1:9])).hexdigest()
        blobs = srv.app.state.hub.storage.blobs
        assert list((srv.root / "tmp").iterdir()) == [] and not blobs.exists(sha)
        r = httpx2.post(f"{srv.url}/v1/shards", content=build_shard([good], [entry]), headers=auth)
        assert r.status_code == 200, r.text
        assert blobs.hash_file(sha).sha256 == sha and list((srv.root / "tmp").iterdir()) == []


def test_a_server_without_xet_gets_a_clear_error():
    from adapterkit.hub import _hub_error

    raised = ConnectionError(
        "Network error: Request error: HTTP status client error (404 Not Found), "
        "domain: http://127.0.0.1:9/api/models/a/b/xet-write-token/main"
    )
    out = _hub_error(raised, "a/b")
    assert (
        isinstance(out, RuntimeError)
        and "does not speak Xet" in str(out)
        and "HF_HUB_DISABLE_XET=1" in str(out)
    )


def test_reconstruction_of_a_byte_range_and_past_the_end(xsrv):
    repo = api(xsrv).create_repo(unique("range")).repo_id
    data = rand(200_000, 8)
    api(xsrv).upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=repo)
    file_hash = httpx2.head(f"{xsrv.url}/{repo}/resolve/main/w.bin").headers["x-xet-hash"]
    token = cas_token(xsrv, repo, "read", None).json()["accessToken"]  # anonymous: the repo is public
    auth = {"authorization": f"Bearer {token}"}
    url = f"{xsrv.url}/v1/reconstructions/{file_hash}"
    whole = httpx2.get(url, headers=auth).json()
    part = httpx2.get(url, headers={**auth, "range": "bytes=150000-150099"}).json()
    assert part["terms"] and sum(t["unpacked_length"] for t in part["terms"]) < sum(
        t["unpacked_length"] for t in whole["terms"]
    )
    past = httpx2.get(url, headers={**auth, "range": f"bytes={len(data)}-"})
    assert (past.status_code, past.headers["x-error-code"]) == (416, "RangeNotSatisfiable")
