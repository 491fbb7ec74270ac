"""History storage: content-addressed folders shared by commits, and roots of the first format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.storage import RepoKey, commit_id, file_entry
from huggingface_hub import HfApi, hf_hub_download

TOKEN = "history-token-0123456789"


def _blob(root: Path, data: bytes) -> dict:
    sha256 = hashlib.sha256(data).hexdigest()
    sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    path = root / "objects" / sha256[:2] / sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return file_entry(sha256, sha1, len(data), False)


def _legacy_root(root: Path) -> list[str]:
    """A registry root as the first storage format wrote it: full file tables, ids in refs.json."""
    repo = root / "repos" / "models" / "alice" / "old"
    (repo / "commits").mkdir(parents=True)
    (repo / "lfs").mkdir()
    (root / "registry.json").write_text(json.dumps({"format_version": 1}))
    (repo / "repo.json").write_text(
        json.dumps(
            {
                "id": "alice/old",
                "type": "model",
                "private": False,
                "owner": "alice",
                "createdAt": "2025-01-01T00:00:00.000Z",
            }
        )
    )
    tables = [
        {},
        {"a/x.txt": _blob(root, b"one")},
        {"a/x.txt": _blob(root, b"two"), "README.md": _blob(root, b"---\ntags: [legacy]\n---\n")},
    ]
    ids: list[str] = []
    for i, table in enumerate(tables):
        body = {
            "format_version": 1,
            "parents": ids[-1:],
            "tree": table,
            "author": "alice",
            "title": f"c{i}",
            "message": "",
            "date": f"2025-01-0{i + 1}T00:00:00.000Z",
            "nonce": f"n{i}",
        }
        cid = commit_id(body)
        (repo / "commits" / f"{cid}.json").write_text(json.dumps({**body, "id": cid}))
        ids.append(cid)
    refs = {"branches": {"main": ids[-1]}, "tags": {"v1": {"target": ids[1], "message": ""}}, "commits": ids}
    (repo / "refs.json").write_text(json.dumps(refs))
    return ids


def test_roots_of_the_first_format_still_load_and_accept_commits(tmp_path):
    root = tmp_path / "root"
    ids = _legacy_root(root)
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
