"""Registry round trips with the real `huggingface_hub` client over real HTTP on loopback."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)

CARD = """---
library_name: adapterkit
tags: [continual-learning]
base_model: resnet50.a1_in1k
---
# Family
"""


def _name(prefix: str = "fam") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _write_family(folder: Path, seed: int = 0) -> dict[str, bytes]:
    files = {
        "README.md": CARD.encode(),
        "adapterkit.json": b'{"backbone": {"name": "resnet50.a1_in1k"}, "domains": {"cifar": {"num_classes": 10}}}',
        "basis.safetensors": os.urandom(2048 + seed),
        "domains/cifar.safetensors": os.urandom(1500),
        "domains/nested/deep.bin": os.urandom(10),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


@pytest.fixture
def alice(registry) -> HfApi:
    return HfApi(endpoint=registry.url, token=registry.tokens["alice"])


def test_upload_folder_download_roundtrip(registry, alice, tmp_path):
    url = alice.create_repo(_name())  # no namespace: the server picks the token's user
    repo_id = url.repo_id
    assert repo_id.startswith("alice/") and url.startswith(registry.url)
    assert alice.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # 409 path carries the url
    files = _write_family(tmp_path / "src")
    first = alice.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id, commit_message="v1")
    assert len(first.oid) == 40

    for rel, data in files.items():
        assert Path(hf_hub_download(repo_id, rel)).read_bytes() == data
    snap = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache"))
    assert {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()} == set(files)
    assert all((snap / rel).read_bytes() == data for rel, data in files.items())
    local = Path(hf_hub_download(repo_id, "domains/cifar.safetensors", local_dir=tmp_path / "local"))
    assert local.read_bytes() == files["domains/cifar.safetensors"]

    # Re-uploading identical content makes no commit.
    again = alice.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id, commit_message="same")
    assert again.oid == first.oid
    assert len(alice.list_repo_commits(repo_id)) == 2  # initial commit + v1


def test_upload_file_create_commit_and_deletes(alice):
    repo_id = alice.create_repo(_name()).repo_id
    alice.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id=repo_id)
    ops = [
        CommitOperationAdd("c.txt", b"see"),
        CommitOperationAdd("a/d.txt", b"dee"),
        CommitOperationDelete("a/b.txt"),
    ]
    info = alice.create_commit(repo_id, ops, commit_message="mixed", commit_description="details")
    assert sorted(alice.list_repo_files(repo_id)) == ["a/d.txt", "c.txt"]
    commit = alice.list_repo_commits(repo_id)[0]
    assert (commit.commit_id, commit.title, commit.message, commit.authors) == (
        info.oid,
        "mixed",
        "details",
        ["alice"],
    )
    alice.delete_folder("a", repo_id=repo_id)
    assert alice.list_repo_files(repo_id) == ["c.txt"]
    alice.delete_file("c.txt", repo_id=repo_id)
    assert alice.list_repo_files(repo_id) == []
    assert alice.file_exists(repo_id, "c.txt") is False


def test_revisions_pin_versions(alice, tmp_path):
    repo_id = alice.create_repo(_name()).repo_id
    v1 = alice.upload_file(path_or_fileobj=b"one", path_in_repo="w.bin", repo_id=repo_id).oid
    alice.create_tag(repo_id, tag="v1")
    alice.create_tag(repo_id, tag="v1", exist_ok=True)
    alice.create_branch(repo_id, branch="feat/x")  # slash: arrives as one %2F-encoded segment
    v2 = alice.upload_file(path_or_fileobj=b"two", path_in_repo="w.bin", repo_id=repo_id).oid
    v3 = alice.upload_file(
        path_or_fileobj=b"three", path_in_repo="w.bin", repo_id=repo_id, revision="feat/x"
    ).oid
    cache = tmp_path / "cache"

    def read(rev: str) -> bytes:
        return Path(hf_hub_download(repo_id, "w.bin", revision=rev, cache_dir=cache)).read_bytes()

    assert read("main") == b"two" and read(v2) == b"two"
    assert (
        read("v1") == b"one"
        and read("refs/tags/v1") == b"one"
        and read(v1) == b"one"
        and read(v1[:7]) == b"one"
    )
    assert read("feat/x") == b"three" and read("refs/heads/feat/x") == b"three" and read(v3[:12]) == b"three"
    assert alice.model_info(repo_id, revision="v1").sha == v1
    snap = Path(snapshot_download(repo_id, revision="v1", cache_dir=tmp_path / "snap"))
    assert snap.name == v1 and (snap / "w.bin").read_bytes() == b"one"

    refs = alice.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2, "feat/x": v3}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", v1)] and refs.converts == []
    assert [c.commit_id for c in alice.list_repo_commits(repo_id, revision="feat/x")][:2] == [v3, v1]
    alice.delete_tag(repo_id, tag="v1")
    alice.delete_branch(repo_id, branch="feat/x")
    assert not alice.revision_exists(repo_id, "v1") and not alice.revision_exists(repo_id, "feat/x")
    assert alice.revision_exists(repo_id, v1)  # commits stay addressable by sha


def test_tree_paths_info_and_model_info(alice, tmp_path):
    repo_id = alice.create_repo(_name()).repo_id
    files = _write_family(tmp_path)
    head = alice.upload_folder(folder_path=tmp_path, repo_id=repo_id).oid
    top = {e.path: type(e).__name__ for e in alice.list_repo_tree(repo_id)}
    assert top == {
        "README.md": "RepoFile",
        "adapterkit.json": "RepoFile",
        "basis.safetensors": "RepoFile",
        "domains": "RepoFolder",
        "empty.txt": "RepoFile",
    }
    sub = list(alice.list_repo_tree(repo_id, path_in_repo="domains", recursive=True, expand=True))
    assert sorted(e.path for e in sub) == [
        "domains/cifar.safetensors",
        "domains/nested",
        "domains/nested/deep.bin",
    ]
    assert all(e.last_commit.oid == head for e in sub)
    infos = alice.get_paths_info(repo_id, ["README.md", "domains", "missing.txt"])
    assert [(type(i).__name__, i.path) for i in infos] == [
        ("RepoFile", "README.md"),
        ("RepoFolder", "domains"),
    ]
    assert infos[0].size == len(files["README.md"]) and infos[0].lfs is None

    info = alice.model_info(repo_id, files_metadata=True)
    assert info.sha == head and info.private is False and info.library_name == "adapterkit"
    assert {"adapterkit", "continual-learning", "base_model:resnet50.a1_in1k"} <= set(info.tags)
    assert info.card_data["base_model"] == "resnet50.a1_in1k"
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {rel: len(data) for rel, data in files.items()}
    assert info.created_at is not None and info.last_modified is not None


def test_tree_pagination_with_link_header(tmp_path):
    from adapterkit_registry import RegistryServer

    with RegistryServer(
        tmp_path / "root", page_size=2, tokens={"paging-token-0123456": ("carol", "write")}
    ) as srv:
        api = HfApi(endpoint=srv.url, token="paging-token-0123456")
        repo_id = api.create_repo("many").repo_id
        api.create_commit(
            repo_id, [CommitOperationAdd(f"f{i}.txt", b"x%d" % i) for i in range(5)], commit_message="m"
        )
        assert sorted(api.list_repo_files(repo_id)) == [f"f{i}.txt" for i in range(5)]
        r = httpx2.get(f"{srv.url}/api/models/{repo_id}/tree/main")
        assert len(r.json()) == 2 and 'rel="next"' in r.headers["link"]
        for i in range(3):
            api.create_repo(f"m{i}")
        assert len(list(api.list_models(author="carol"))) == 4


def test_list_models_filter_search_author(registry, alice):
    bob = HfApi(endpoint=registry.url, token=registry.tokens["bob"])
    tag = f"t{uuid.uuid4().hex[:6]}"
    card = CARD.replace("[continual-learning]", f"[continual-learning, {tag}]")
    fam = alice.create_repo(_name("searchme")).repo_id
    alice.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=fam)
    other = bob.create_repo(_name("searchme")).repo_id
    bob.upload_file(
        path_or_fileobj=card.replace("resnet50.a1_in1k", "vit_small").encode(),
        path_in_repo="README.md",
        repo_id=other,
    )

    api = HfApi(endpoint=registry.url, token=False)
    assert {m.id for m in api.list_models(filter=[tag])} == {fam, other}
    assert [m.id for m in api.list_models(filter=["adapterkit", tag, "base_model:resnet50.a1_in1k"])] == [fam]
    assert [m.id for m in api.list_models(filter=[tag], author="bob")] == [other]
    assert {m.id for m in api.list_models(search="searchme", filter=tag)} == {fam, other}
    assert [m.id for m in api.list_models(filter=[tag, "no-such-tag"])] == []
    newest = list(api.list_models(filter=[tag], sort="last_modified", limit=1))
    assert [m.id for m in newest] == [other]
    full = next(iter(api.list_models(filter=[tag], author="alice", full=True, cardData=True)))
    assert full.siblings[0].rfilename == "README.md" and full.card_data["library_name"] == "adapterkit"


def test_resolve_headers_and_range(registry, alice):
    repo_id = alice.create_repo(_name()).repo_id
    data = os.urandom(1000)
    head = alice.upload_file(path_or_fileobj=data, path_in_repo="x.bin", repo_id=repo_id).oid
    url = f"{registry.url}/{repo_id}/resolve/main/x.bin"
    h = httpx2.head(url)
    assert h.status_code == 200 and h.headers["x-repo-commit"] == head
    assert (
        h.headers["content-length"] == "1000"
        and h.headers["etag"].strip('"') == alice.get_paths_info(repo_id, ["x.bin"])[0].blob_id
    )
    r = httpx2.get(url, headers={"Range": "bytes=100-"})
    assert (
        r.status_code == 206
        and r.content == data[100:]
        and r.headers["content-range"] == "bytes 100-999/1000"
    )
    r = httpx2.get(url, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = httpx2.get(url, headers={"Range": "bytes=5000-"})
    assert r.status_code == 416 and r.headers["x-error-code"] == "RangeNotSatisfiable"


def test_web_page_lists_families_escaped(registry, alice):
    repo_id = alice.create_repo(_name("web")).repo_id
    family = b'{"backbone": {"name": "resnet<b>50"}, "domains": {"<script>x</script>": {"num_classes": 7, "metrics": {"acc": 0.875}}}}'
    alice.upload_file(path_or_fileobj=family, path_in_repo="adapterkit.json", repo_id=repo_id)
    private = alice.create_repo(_name("hidden"), private=True).repo_id
    page = httpx2.get(registry.url + "/").text
    assert repo_id in page and "resnet&lt;b&gt;50" in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<script>" not in page and "0.875" in page and private not in page


def test_validate_yaml_and_datasets(registry, alice):
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        alice.upload_file(
            path_or_fileobj=b"---\n- a list\n---\n",
            path_in_repo="README.md",
            repo_id=alice.create_repo(_name()).repo_id,
        )
    ds = alice.create_repo(_name("ds"), repo_type="dataset").repo_id
    alice.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=ds, repo_type="dataset")
    assert Path(hf_hub_download(ds, "data.csv", repo_type="dataset")).read_bytes() == b"a,b\n1,2\n"
    assert alice.list_repo_files(ds, repo_type="dataset") == ["data.csv"]
    assert alice.dataset_info(ds).id == ds
    alice.delete_repo(ds, repo_type="dataset")
    assert not alice.repo_exists(ds, repo_type="dataset")


def test_odd_but_valid_file_names(alice, tmp_path):
    repo_id = alice.create_repo(_name()).repo_id
    names = ["dir with space/ü#%20x.txt", "a+b=c&d?.json", "-dash/.hidden"]
    alice.create_commit(repo_id, [CommitOperationAdd(n, n.encode()) for n in names], commit_message="odd")
    assert sorted(alice.list_repo_files(repo_id)) == sorted(names)
    for n in names:
        assert Path(hf_hub_download(repo_id, n, cache_dir=tmp_path)).read_bytes() == n.encode()
    assert [e.path for e in alice.list_repo_tree(repo_id, path_in_repo="dir with space")] == [names[0]]
