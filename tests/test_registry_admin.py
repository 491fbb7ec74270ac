"""Administration: refusals that name the problem and the fix, fsck on a wrong root, and gc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx2
from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.collect import collect_garbage
from huggingface_hub import HfApi

CLI = [sys.executable, "-m", "adapterkit_registry"]
TOKEN = "admin-test-token-0123456"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_refusals_are_one_line_without_traceback(tmp_path):
    missing = tmp_path / "typo"
    for args in (
        ["fsck", "--root", str(missing)],
        ["gc", "--root", str(missing)],
        ["token", "list", "--root", str(missing)],
    ):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert (
            len(r.stderr.strip().splitlines()) == 1
            and "not a registry root" in r.stderr
            and "--root" in r.stderr
        )
    assert not missing.exists()  # fsck on a mistyped root no longer creates it
    a_file = tmp_path / "file"
    a_file.write_text("x")
    r = cli("serve", "--root", str(a_file), "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--root" in r.stderr, r.stderr
    verbose = cli("fsck", "--root", str(missing), "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_second_server_on_a_root_is_refused_in_one_line(tmp_path):
    root = tmp_path / "root"
    with RegistryServer(root):
        r = cli("serve", "--root", str(root), "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Another registry server is already using" in r.stderr and "--root" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr


def test_gc_removes_only_unreferenced_blobs(tmp_path):
    root = tmp_path / "root"
    with RegistryServer(root, tokens={TOKEN: ("alice", "write")}) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        repo = api.create_repo("alice/g").repo_id
        api.upload_file(path_or_fileobj=b"kept content", path_in_repo="k.txt", repo_id=repo)
        gone = api.create_repo("alice/gone").repo_id
        api.upload_file(path_or_fileobj=b"content of a deleted repo", path_in_repo="d.txt", repo_id=gone)
        api.delete_repo(gone)
        # A rejected commit (the file would sit under an existing file) stores its blob first.
        body = b'{"key":"header","value":{"summary":"s"}}\n{"key":"file","value":{"path":"k.txt/x","content":"cmVqZWN0ZWQ="}}\n'
        r = httpx2.post(
            f"{srv.url}/api/models/{repo}/commit/main",
            content=body,
            headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/x-ndjson"},
        )
        assert r.status_code == 400
    assert (
        "2 unreferenced blob(s); remove them with `adapterkit-registry gc"
        in cli("fsck", "--root", str(root)).stdout
    )
    storage = Storage(root, create=False)
    before = {p.name for p in storage.blobs.all()}
    assert collect_garbage(storage, grace_s=3600).removed == 0  # too recent: a commit may be in flight
    report = collect_garbage(storage, grace_s=0)
    assert report.unreferenced == report.removed == 2
    after = {p.name for p in storage.blobs.all()}
    assert len(before - after) == 2 and fsck(storage) == []
    os.utime(next(storage.blobs.all()), (time.time() - 7200, time.time() - 7200))
    assert collect_garbage(storage, grace_s=3600).removed == 0  # referenced blobs stay, whatever their age
    assert "0 unreferenced" in cli("gc", "--root", str(root)).stdout
