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


def test_a_move_during_gc_or_backup_is_refused_with_503_and_changes_nothing(srv):
    from adapterkit_registry.flock import maintenance_lock

    api = HfApi(endpoint=srv.url, token=ALICE)
    api.create_repo("alice/src")
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/src")
    with maintenance_lock(srv.root, "gc"):  # what a running gc or backup holds
        with pytest.raises(HfHubHTTPError) as e:
            api.move_repo("alice/src", "alice/dst")
    assert status(e) == 503 and e.value.response.headers["Retry-After"] == "60"
    assert "gc or backup" in e.value.response.headers["X-Error-Message"]
    assert api.model_info("alice/src").id == "alice/src"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/dst")
    api.move_repo("alice/src", "alice/dst")  # once it has finished
    assert api.model_info("alice/dst").id == "alice/dst"


def test_gc_and_backup_are_refused_while_a_move_holds_the_maintenance_lock(tmp_path):
    from adapterkit_registry.backup import backup
    from adapterkit_registry.collect import collect_garbage
    from adapterkit_registry.errors import RegistryError
    from adapterkit_registry.flock import MAINTENANCE_LOCK, file_lock

    storage = Storage(tmp_path / "root")
    with file_lock(storage.root / MAINTENANCE_LOCK, shared=True):  # what a move holds
        for run in (lambda: collect_garbage(storage), lambda: backup(storage, tmp_path / "b")):
            with pytest.raises(RegistryError, match="repo move is running"):
                run()
    assert not (tmp_path / "b").exists()


def _moving_storage(root: Path, at: int) -> tuple[Storage, list[int]]:
    """A storage whose `at`-th repo listing is followed by a move of alice/src to alice/dst: the racy
    order of a move landing between a gc's (or a backup's) scan and what it does with the scan."""
    from adapterkit_registry.errors import HubError
    from adapterkit_registry.move import move
    from adapterkit_registry.storage import RepoKey

    answers: list[int] = []

    class MoveAfterListing(Storage):
        listings = 0

        def list_repos(self, repo_type=None):  # noqa: ANN001, ANN202
            out = super().list_repos(repo_type)
            self.listings += 1
            if self.listings == at:
                try:
                    move(self, RepoKey("model", "alice", "src"), RepoKey("model", "alice", "dst"))
                    answers.append(200)
                except HubError as e:
                    answers.append(e.status)
            return out

    return MoveAfterListing(root, create=False), answers


@pytest.fixture
def pushed(tmp_path) -> tuple[Path, str]:
    """A stopped root with alice/src holding an inline file and a Xet file; (root, the Xet hash)."""
    root = tmp_path / "root"
    with RegistryServer(root, tokens={ALICE: ("alice", "write")}, lfs_threshold_mb=0.05) as server:
        api = HfApi(endpoint=server.url, token=ALICE)
        api.create_repo("alice/src")
        api.upload_file(path_or_fileobj=b"small", path_in_repo="a.txt", repo_id="alice/src")
        api.upload_file(path_or_fileobj=BIG, path_in_repo="big.bin", repo_id="alice/src")
    (marker,) = (root / "repos" / "models" / "alice" / "src" / "lfs").iterdir()
    return root, json.loads(marker.read_text())["xet"]


@pytest.mark.parametrize("at", [1, 2], ids=["during-blob-scan", "during-xet-scan"])
def test_gc_keeps_everything_of_a_repo_moved_during_its_scan(pushed, at):
    from adapterkit_registry.collect import collect_garbage
    from adapterkit_registry.xet_store import XetStore

    root, xet_hash = pushed
    storage, answers = _moving_storage(root, at)
    collect_garbage(storage, grace_s=0, xorb_grace_s=0)  # everything unreferenced goes
    assert fsck(Storage(root, create=False)) == []  # every blob of every revision is there
    assert XetStore(root / "xet", read_only=True).file(xet_hash) is not None
    assert answers == [503]  # refused: gc holds the maintenance lock
    with RegistryServer(root) as server:  # the tokens are in the root
        api = HfApi(endpoint=server.url, token=ALICE)
        got = hf_hub_download(
            "alice/src", "big.bin", token=ALICE, endpoint=server.url, cache_dir=root.parent / "c"
        )
        assert Path(got).read_bytes() == BIG
        api.move_repo("alice/src", "alice/dst")  # and the move goes through afterwards


def test_backup_holds_a_repo_moved_during_its_listing(pushed, tmp_path):
    from adapterkit_registry.backup import backup

    root, _ = pushed
    storage, answers = _moving_storage(root, 1)
    report = backup(storage, tmp_path / "copy", deep=False)
    assert report.problems == [] and report.repos == 1
    assert (tmp_path / "copy" / "repos" / "models" / "alice" / "src" / "repo.json").is_file()
    assert answers == [503]


def test_an_lfs_record_for_a_repo_moved_meanwhile_is_refused(tmp_path):
    """A shard or LFS upload checked against alice/src, recorded after a move to alice/dst: 404, and
    nothing is written under the old id (which would look like a repo folder without repo.json)."""
    from adapterkit_registry.blobs import BlobInfo
    from adapterkit_registry.errors import HubError
    from adapterkit_registry.move import move
    from adapterkit_registry.storage import RepoKey

    storage = Storage(tmp_path / "root")
    src, dst = RepoKey("model", "alice", "src"), RepoKey("model", "alice", "dst")
    storage.create_repo(src, "alice", private=False)
    move(storage, src, dst)
    with pytest.raises(HubError) as e:
        storage.register_lfs(src, BlobInfo("a" * 64, "b" * 40, 5), xet_hash="c" * 64)
    assert e.value.status == 404
    assert not storage.repo_dir(src).exists() and not list((storage.repo_dir(dst) / "lfs").iterdir())
