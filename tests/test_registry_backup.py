"""`adapterkit-registry backup` beside a live server: a writer keeps committing through the real client
(inline and Xet files) while the backup runs; the copy passes fsck and, served, answers every repo at one
acknowledged revision whose files all agree and download bit-identically."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from adapterkit_registry import RegistryServer, Storage, fsck
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

CLI = [sys.executable, "-m", "adapterkit_registry"]
TOKEN = "backup-test-token-0123"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def big(i: int) -> bytes:
    """A file above the 50 KB LFS threshold: it goes through Xet."""
    return np.random.default_rng(i).bytes(60_000 + i)


def commit_round(api: HfApi, repo: str, i: int) -> str:
    """Commit `a.txt` and `b.txt` (both `i`) and, every third round, `big.bin` = big(i)."""
    ops = [CommitOperationAdd(name, str(i).encode()) for name in ("a.txt", "b.txt")]
    if i % 3 == 0:
        ops.append(CommitOperationAdd("big.bin", big(i)))
    return api.create_commit(repo, ops, commit_message=f"round {i}").oid


def test_backup_while_committing_is_consistent_and_restores(tmp_path):
    root, copy = tmp_path / "root", tmp_path / "backups" / "copy"
    acked: dict[str, dict[str, int]] = {"alice/live": {}, "alice/other": {}}
    with RegistryServer(root, tokens={TOKEN: ("alice", "write")}, lfs_threshold_mb=0.05) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        for repo in acked:
            api.create_repo(repo, private=repo == "alice/other")
            acked[repo][commit_round(api, repo, 0)] = 0
        stop = threading.Event()

        def writer() -> None:
            i = 1
            while not stop.is_set():
                for repo in acked:
                    acked[repo][commit_round(api, repo, i)] = i
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while len(acked["alice/live"]) < 4:  # commits before, during and after the copy
                thread.join(0.05)
            r = cli("backup", "--root", str(root), str(copy))
            n_during = len(acked["alice/live"])
            while len(acked["alice/live"]) < n_during + 2:
                thread.join(0.05)
        finally:
            stop.set()
            thread.join()
    assert r.returncode == 0 and "fsck ok" in r.stdout, r.stdout + r.stderr
    assert fsck(Storage(copy, create=False)) == []
    with RegistryServer(copy) as restored:  # the tokens came along
        api = HfApi(endpoint=restored.url, token=TOKEN)
        for repo, revisions in acked.items():
            head = api.model_info(repo).sha
            assert head in revisions, f"{repo}: the copy's head is not an acknowledged commit"
            i = revisions[head]
            for name in ("a.txt", "b.txt"):
                got = hf_hub_download(
                    repo, name, token=TOKEN, endpoint=restored.url, cache_dir=tmp_path / "c"
                )
                assert open(got, "rb").read() == str(i).encode()
            got = hf_hub_download(
                repo, "big.bin", token=TOKEN, endpoint=restored.url, cache_dir=tmp_path / "c"
            )
            assert open(got, "rb").read() == big(i - i % 3)  # through Xet, from the copied xorbs
            assert len(api.list_repo_commits(repo)) == i + 2  # the whole history, initial commit included


def test_backup_refuses_a_non_empty_destination_and_leaves_it(tmp_path):
    root, dest = tmp_path / "root", tmp_path / "dest"
    with RegistryServer(root, tokens={TOKEN: ("alice", "write")}) as srv:
        HfApi(endpoint=srv.url, token=TOKEN).create_repo("alice/x")
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
        r = cli("backup", "--root", str(root), str(dest))
        assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert [p.name for p in dest.iterdir()] == ["keep.txt"]
        inside = cli("backup", "--root", str(root), str(root / "b"))
        assert inside.returncode == 2 and "outside" in inside.stderr
        (dest / "keep.txt").unlink()  # an empty folder is fine
        ok = cli("backup", "--root", str(root), str(dest), "--quick")
        assert ok.returncode == 0, ok.stderr
    assert (dest / "repos" / "models" / "alice" / "x" / "refs.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_backup_copies_xet_records_without_the_apply_lock_and_catches_up_under_it(tmp_path, monkeypatch):
    """Shards are registered while the backup copies the Xet records; one registered after that copy
    (rewriting a shared dedupe index entry) and a journal applied meanwhile are caught up under the lock."""
    import json

    from adapterkit_registry import backup as backup_module
    from adapterkit_registry.errors import RegistryError
    from adapterkit_registry.flock import XET_APPLY_LOCK, file_lock
    from adapterkit_registry.xet_shard import build_shard
    from adapterkit_registry.xet_store import XetStore
    from xet_support import CHUNKS, shard_file, xorb_parts

    storage = Storage(tmp_path / "root")
    xet = storage.root / "xet"
    store = XetStore(xet)
    name, blob, cas = xorb_parts(CHUNKS[:6])
    store.put_xorb(name, blob)
    store.put_shard(build_shard([shard_file(name, CHUNKS[:6], 0, 3)], [cas]))
    stale = xet / "pending" / ("0" * 64 + ".json")
    stale.write_text(json.dumps({"shard": "0" * 64, "xorbs": [], "files": [], "chunks": []}))
    lock_free, late = [], []
    real_tree, real_lock = backup_module._Copier.tree, backup_module.file_lock

    def tree(self, src: Path, dst: Path, skip: frozenset[str] = frozenset()) -> None:  # noqa: ANN001
        if src == xet / "files":
            try:
                with file_lock(xet / XET_APPLY_LOCK, blocking=False):
                    lock_free.append(True)
            except RegistryError:
                lock_free.append(False)
        real_tree(self, src, dst, skip)

    def lock(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not late:  # after the records were copied, before the lock
            late.extend(store.put_shard(build_shard([shard_file(name, CHUNKS[:6], 0, 6)], [cas])))
            stale.unlink()  # a journal applied meanwhile
        return real_lock(*args, **kwargs)

    monkeypatch.setattr(backup_module._Copier, "tree", tree)
    monkeypatch.setattr(backup_module, "file_lock", lock)
    report = backup_module.backup(storage, tmp_path / "copy")
    monkeypatch.undo()
    assert lock_free == [True] and report.problems == []
    copy = XetStore(tmp_path / "copy" / "xet", read_only=True)
    assert copy.pending() == [] and copy.file(late[0].file_hash) is not None
    for folder in ("files", "sha256", "shards", "chunks"):
        for path in (xet / folder).glob("*/*.json"):
            assert (
                tmp_path / "copy" / "xet" / folder / path.relative_to(xet / folder)
            ).read_bytes() == path.read_bytes()
