"""Concurrency and crash safety: conflicting commits, and SIGKILL in the middle of uploads."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import adapterkit_registry.storage as storage_module
import httpx2
import pytest
from adapterkit_registry import Storage, create_token, fsck
from adapterkit_registry.storage import RepoKey, file_entry
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from registry_support import _serve


def test_conflicting_commits_one_wins_the_other_gets_412(registry):
    api = HfApi(endpoint=registry.url, token=registry.tokens["alice"])
    repo_id = api.create_repo(f"race-{uuid.uuid4().hex[:8]}").repo_id
    parent = api.upload_file(path_or_fileobj=b"base", path_in_repo="f.txt", repo_id=repo_id).oid
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def commit(who: str) -> None:
        barrier.wait()
        try:
            ops = [CommitOperationAdd("f.txt", who.encode())]
            results[who] = api.create_commit(repo_id, ops, commit_message=who, parent_commit=parent).oid
        except HfHubHTTPError as e:
            results[who] = e

    threads = [threading.Thread(target=commit, args=(w,)) for w in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [w for w, r in results.items() if isinstance(r, str)]
    losers = [r for r in results.values() if isinstance(r, HfHubHTTPError)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].response.status_code == 412 and "Conflict" in str(losers[0])
    assert api.model_info(repo_id).sha == results[winners[0]]
    path = hf_hub_download(repo_id, "f.txt", revision=results[winners[0]], endpoint=registry.url)
    assert Path(path).read_bytes() == winners[0].encode()
    assert len(api.list_repo_commits(repo_id)) == 3


def test_concurrent_commits_lose_nothing(registry):
    api = HfApi(endpoint=registry.url, token=registry.tokens["bob"])
    repo_id = api.create_repo(f"busy-{uuid.uuid4().hex[:8]}").repo_id
    threads = [
        threading.Thread(
            target=api.upload_file,
            kwargs={"path_or_fileobj": b"%d" % i, "path_in_repo": f"{i}.txt", "repo_id": repo_id},
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(api.list_repo_files(repo_id)) == sorted(f"{i}.txt" for i in range(6))
    assert len(api.list_repo_commits(repo_id)) == 7


def _commit_blob(storage: Storage, key: RepoKey, info) -> str:
    """Commit a stored blob as file `a` on `main`, straight through the storage layer."""
    return storage.commit(
        key, "main", [("add", "a", file_entry(info.sha256, info.sha1, info.size, False))], "alice", "t", ""
    )


def test_interrupted_commit_leaves_previous_state(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    key = RepoKey("model", "alice", "crashy")
    storage.create_repo(key, "alice", private=False)
    before = storage.refs(key)
    info = storage.blobs.put_bytes(b"data")
    real = storage_module.atomic_write_json

    def crash_on_refs(path, obj, tmp_dir):
        if Path(path).name == "refs.json":
            raise OSError("simulated crash before the refs update")
        real(path, obj, tmp_dir)

    monkeypatch.setattr(storage_module, "atomic_write_json", crash_on_refs)
    with pytest.raises(OSError):
        _commit_blob(storage, key, info)
    monkeypatch.undo()
    assert storage.refs(key) == before  # the orphan commit file is invisible ...
    assert len(list((storage.repo_dir(key) / "commits").glob("*.json"))) == 2
    Storage(tmp_path).recover()  # ... and removed at the next start
    assert len(list((storage.repo_dir(key) / "commits").glob("*.json"))) == 1
    assert fsck(Storage(tmp_path)) == []


def test_a_crash_after_the_commit_point_is_consistent_and_repaired_at_the_next_start(tmp_path, monkeypatch):
    """Killed between `refs.json` (the commit point) and the commit log's append: the branch shows the
    commit, fsck finds nothing wrong, and the next start logs the commit."""
    storage = Storage(tmp_path)
    key = RepoKey("model", "alice", "late-log")
    storage.create_repo(key, "alice", private=False)
    info = storage.blobs.put_bytes(b"data")

    def crash(path, cid):
        raise OSError("simulated crash before the log append")

    monkeypatch.setattr(storage.log, "append", crash)
    with pytest.raises(OSError):
        _commit_blob(storage, key, info)
    monkeypatch.undo()
    head = storage.refs(key)["branches"]["main"]
    assert head not in storage.known_commits(key)
    assert fsck(Storage(tmp_path, create=False)) == []
    Storage(tmp_path).recover()
    assert head in Storage(tmp_path, create=False).known_commits(key)
    assert fsck(Storage(tmp_path, create=False)) == []
    # a ref to a commit that has no file is still a problem
    refs = storage.refs(key)
    refs["branches"]["main"] = "0" * 40
    (storage.repo_dir(key) / "refs.json").write_text(json.dumps(refs))
    assert f"alice/late-log: ref points to unknown commit {'0' * 40}" in fsck(Storage(tmp_path, create=False))


# --------------------------------------------------------------------------- SIGKILL test


def _partial_request(
    url: str, method: str, target: str, body: bytes, headers: dict[str, str]
) -> http.client.HTTPConnection:
    """Send the headers and half of the body, then leave the request hanging."""
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    conn.putrequest(method, target)
    for k, v in {**headers, "Content-Length": str(len(body))}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(body[: len(body) // 2])
    return conn


def test_sigkill_during_uploads_loses_nothing_acknowledged(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS files go through the batch API
    root, log = tmp_path / "root", tmp_path / "server.log"
    token = create_token(root, "frank")
    proc, url = _serve(root, log)
    try:
        api = HfApi(endpoint=url, token=token)
        repo_id = api.create_repo("durable").repo_id
        acked: list[tuple[str, dict[str, bytes]]] = []
        state: dict[str, bytes] = {}
        for step in range(3):
            ops = {
                f"small/{step}.json": os.urandom(200),
                f"w{step}.safetensors": os.urandom(80_000),
            }  # regular + LFS
            state.update(ops)
            oid = api.create_commit(
                repo_id, [CommitOperationAdd(p, d) for p, d in ops.items()], commit_message=f"s{step}"
            ).oid
            acked.append((oid, dict(state)))
        api.create_tag(repo_id, tag="v0", revision=acked[0][0])

        # An LFS object uploaded and acknowledged, but not committed yet.
        auth = {"authorization": f"Bearer {token}"}
        kept = os.urandom(70_000)
        kept_oid = hashlib.sha256(kept).hexdigest()
        batch = {"operation": "upload", "objects": [{"oid": kept_oid, "size": len(kept)}]}
        href = httpx2.post(f"{url}/{repo_id}.git/info/lfs/objects/batch", json=batch, headers=auth).json()
        assert httpx2.put(href["objects"][0]["actions"]["upload"]["href"], content=kept).status_code == 200

        # Two uploads in flight: a streaming LFS PUT and a large NDJSON commit.
        big = os.urandom(4_000_000)
        big_oid = hashlib.sha256(big).hexdigest()
        batch = {"operation": "upload", "objects": [{"oid": big_oid, "size": len(big)}]}
        put_href = httpx2.post(f"{url}/{repo_id}.git/info/lfs/objects/batch", json=batch, headers=auth).json()
        put_target = put_href["objects"][0]["actions"]["upload"]["href"][len(url) :]
        lines = [
            {"key": "header", "value": {"summary": "never acknowledged"}},
            {
                "key": "file",
                "value": {"path": "half.bin", "content": base64.b64encode(os.urandom(3_000_000)).decode()},
            },
        ]
        commit_body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        conns = [
            _partial_request(url, "PUT", put_target, big, {}),
            _partial_request(
                url,
                "POST",
                f"/api/models/{repo_id}/commit/main",
                commit_body,
                {**auth, "Content-Type": "application/x-ndjson"},
            ),
        ]
        deadline = time.monotonic() + 60
        while sum(p.stat().st_size > 0 for p in (root / "tmp").glob("upload-*")) < 2:
            assert time.monotonic() < deadline, "the server never started writing the in-flight uploads"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for c in conns:
            c.close()

        proc, url = _serve(root, log)
        assert list((root / "tmp").iterdir()) == []  # leftovers of the interrupted uploads are gone
        assert fsck(Storage(root)) == []
        api = HfApi(endpoint=url, token=token)
        assert [c.commit_id for c in api.list_repo_commits(repo_id)][:-1] == [
            oid for oid, _ in reversed(acked)
        ]
        assert (
            api.model_info(repo_id).sha == acked[-1][0]
            and api.model_info(repo_id, revision="v0").sha == acked[0][0]
        )
        for i, (oid, files) in enumerate(acked):
            assert sorted(api.list_repo_files(repo_id, revision=oid)) == sorted(files)
            for path, data in files.items():
                got = hf_hub_download(
                    repo_id, path, revision=oid, endpoint=url, cache_dir=tmp_path / f"fresh{i}"
                )
                assert Path(got).read_bytes() == data
        # The acknowledged LFS upload survived and can still be committed.
        line = {
            "key": "lfsFile",
            "value": {"path": "kept.bin", "algo": "sha256", "oid": kept_oid, "size": len(kept)},
        }
        body = (
            json.dumps({"key": "header", "value": {"summary": "after restart"}})
            + "\n"
            + json.dumps(line)
            + "\n"
        )
        r = httpx2.post(f"{url}/api/models/{repo_id}/commit/main", content=body, headers=auth)
        assert r.status_code == 200, r.text
        got = hf_hub_download(repo_id, "kept.bin", endpoint=url, cache_dir=tmp_path / "after")
        assert Path(got).read_bytes() == kept
    finally:
        proc.kill()
        proc.wait()


def test_one_server_per_root(registry):
    from adapterkit_registry import RegistryServer

    with pytest.raises(RuntimeError, match="Another registry server"):
        RegistryServer(registry.root)
