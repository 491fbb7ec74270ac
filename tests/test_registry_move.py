"""`HfApi.move_repo` against the registry over real HTTP: history, refs, LFS/Xet files and visibility move
with the repo; the auth rules of create/delete apply to both namespaces; a private repo the caller cannot
see is 404; bad names are 400, an existing destination 409."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import BadRequestError, HfHubHTTPError, RepositoryNotFoundError

ALICE, BOB = "move-alice-token-0123", "move-bob-token-0123"
BIG = np.random.default_rng(7).bytes(120_000)  # above the 50 KB threshold: through Xet


def status(err: pytest.ExceptionInfo) -> int:
    return err.value.response.status_code


@pytest.fixture
def srv(tmp_path):
    users = {ALICE: ("alice", "write"), BOB: ("bob", "write")}
    with RegistryServer(tmp_path / "root", tokens=users, lfs_threshold_mb=0.05) as server:
        yield server


def test_move_keeps_history_refs_files_and_visibility(srv, tmp_path):
    api = HfApi(endpoint=srv.url, token=ALICE)
    api.create_repo("alice/src", private=True)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/src")
    api.create_tag("alice/src", tag="v1")
    api.upload_file(path_or_fileobj=BIG, path_in_repo="big.bin", repo_id="alice/src")
    api.create_branch("alice/src", branch="dev")
    before = api.model_info("alice/src")
    commits = [c.commit_id for c in api.list_repo_commits("alice/src")]

    api.move_repo("alice/src", "alice/dst")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/src")
    after = api.model_info("alice/dst")
    assert after.id == "alice/dst" and after.sha == before.sha and after.private
    assert [c.commit_id for c in api.list_repo_commits("alice/dst")] == commits
    refs = api.list_repo_refs("alice/dst")
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    got = hf_hub_download("alice/dst", "big.bin", token=ALICE, endpoint=srv.url, cache_dir=tmp_path / "c")
    assert Path(got).read_bytes() == BIG
    old = hf_hub_download(
        "alice/dst", "a.txt", revision="v1", token=ALICE, endpoint=srv.url, cache_dir=tmp_path / "c"
    )
    assert Path(old).read_bytes() == b"v1"
    assert [m.id for m in api.list_models(author="alice")] == ["alice/dst"]
    with pytest.raises(RepositoryNotFoundError):  # still private
        HfApi(endpoint=srv.url, token=BOB).model_info("alice/dst")
    api.create_repo("alice/src")  # the old id is free again, and fresh
    assert len(api.list_repo_commits("alice/src")) == 1
    api.move_repo("alice/dst", "alice/DST")  # a change of case is a move too
    assert api.model_info("alice/dst").id == "alice/DST"
    assert fsck(Storage(srv.root, create=False)) == []


def test_move_follows_the_write_and_privacy_rules(srv):
    alice, bob = HfApi(endpoint=srv.url, token=ALICE), HfApi(endpoint=srv.url, token=BOB)
    alice.create_repo("alice/public")
    alice.create_repo("alice/private", private=True)
    alice.create_repo("alice/taken")
    for api, src in ((bob, "alice/private"), (HfApi(endpoint=srv.url, token=False), "alice/private")):
        with pytest.raises(RepositoryNotFoundError):  # invisible: as if it did not exist
            api.move_repo(src, "bob/x")
    with pytest.raises(RepositoryNotFoundError):
        alice.move_repo("alice/nope", "alice/x")
    with pytest.raises(HfHubHTTPError) as e:  # bob can see it, but not write to alice's namespace
        bob.move_repo("alice/public", "bob/stolen")
    assert status(e) == 403
    with pytest.raises(HfHubHTTPError) as e:  # nor may alice write into bob's
        alice.move_repo("alice/public", "bob/gift")
    assert status(e) == 403
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=srv.url, token=False).move_repo("alice/public", "alice/x")
    assert status(e) == 401
    with pytest.raises(HfHubHTTPError) as e:
        alice.move_repo("alice/public", "alice/TAKEN")  # ids are case-insensitive
    assert status(e) == 409
    for bad in ("alice/bad..name", "alice/x.git", "api/x"):
        with pytest.raises(BadRequestError):
            alice.move_repo("alice/public", bad)
    assert [m.id for m in alice.list_models(author="alice")] == [
        "alice/private",
        "alice/public",
        "alice/taken",
    ]
    team = srv.app.state.hub.tokens.create("alice", "write", "", ("team",))
    HfApi(endpoint=srv.url, token=team).move_repo("alice/public", "team/public")
    assert alice.model_info("team/public").id == "team/public"
    alice.create_repo("alice/data", repo_type="dataset")
    alice.move_repo("alice/data", "alice/data2", repo_type="dataset")
    assert alice.dataset_info("alice/data2").id == "alice/data2"


def test_interrupted_move_is_repaired_at_start(tmp_path):
    root = tmp_path / "root"
    with RegistryServer(root, tokens={ALICE: ("alice", "write")}) as srv:
        HfApi(endpoint=srv.url, token=ALICE).create_repo("alice/moved")
    meta = root / "repos" / "models" / "alice" / "moved" / "repo.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "id": "alice/before"}))  # crash after rename
    with RegistryServer(root) as srv:
        assert HfApi(endpoint=srv.url, token=ALICE).model_info("alice/moved").id == "alice/moved"
    assert json.loads(meta.read_text())["id"] == "alice/moved"
