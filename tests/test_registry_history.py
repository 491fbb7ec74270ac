"""History storage: content-addressed folders shared by commits, and roots of the first format."""

from __future__ import annotations

import json
from pathlib import Path

from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.storage import RepoKey, file_entry
from huggingface_hub import HfApi, hf_hub_download
from registry_support import _legacy_root

TOKEN = "history-token-0123456789"


def test_roots_of_the_first_format_still_load_and_accept_commits(tmp_path):
    root = tmp_path / "root"
    ids = _legacy_root(root)
    assert (
        fsck(Storage(root, create=False)) == []
    )  # fsck reads it and leaves it as it is (rollback stays open)
    assert json.loads((root / "registry.json").read_text())["format_version"] == 1
    with RegistryServer(root, tokens={TOKEN: ("alice", "write")}) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        assert sorted(api.list_repo_files("alice/old")) == ["README.md", "a/x.txt"]
        assert "legacy" in api.model_info("alice/old").tags
        old = hf_hub_download(
            "alice/old", "a/x.txt", revision="v1", endpoint=srv.url, cache_dir=tmp_path / "c"
        )
        assert Path(old).read_bytes() == b"one"
        new = api.upload_file(path_or_fileobj=b"three", path_in_repo="a/y.txt", repo_id="alice/old").oid
        assert sorted(api.list_repo_files("alice/old")) == ["README.md", "a/x.txt", "a/y.txt"]
        assert [c.commit_id for c in api.list_repo_commits("alice/old")] == [new, *ids[::-1]]
        assert (
            api.model_info("alice/old", revision=ids[1][:10]).sha == ids[1]
        )  # short sha of a format-1 commit
        tree = {e.path: e for e in api.list_repo_tree("alice/old", recursive=True, expand=True)}
        assert tree["a/y.txt"].last_commit.oid == new and tree["README.md"].last_commit.oid == ids[2]
        assert "legacy" in api.model_info("alice/old").tags
    assert fsck(Storage(root, create=False)) == []
    assert json.loads((root / "registry.json").read_text())["format_version"] == 2
    assert "commits" not in json.loads((root / "repos/models/alice/old/refs.json").read_text())


def test_commits_share_unchanged_folders(tmp_path):
    storage = Storage(tmp_path / "root")
    key = RepoKey("model", "alice", "deep")
    storage.create_repo(key, "alice", private=False)
    for i in range(40):
        info = storage.blobs.put_bytes(b"file %d" % i)
        entry = file_entry(info.sha256, info.sha1, info.size, False)
        storage.commit(key, "main", [("add", f"d{i % 4}/sub/f{i}.txt", entry)], "alice", f"c{i}", "")
    repo = storage.repo_dir(key)
    sizes = [p.stat().st_size for p in (repo / "commits").glob("*.json")]
    assert max(sizes) < 2 * min(sizes)  # a commit does not grow with the number of files
    trees = list((repo / "trees").rglob("*"))
    # each commit writes at most its changed folders (root, d<k>, d<k>/sub): O(changes x depth)
    assert len([t for t in trees if t.is_file()]) <= 1 + 40 * 3
    head = storage.refs(key)["branches"]["main"]
    assert len(storage.files(key, head)) == 40
    storage.commit(key, "main", [("delete_folder", "d0", None)], "alice", "rm", "")
    head = storage.refs(key)["branches"]["main"]
    assert len(storage.files(key, head)) == 30 and storage.entry(key, head, "d0/sub/f0.txt") is None
    assert storage.entry(key, head, "d1/sub/f1.txt")["size"] == len(b"file 1")
    assert fsck(storage) == []
