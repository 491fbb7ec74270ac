"""Access control, error codes and input validation of the registry (real client, real HTTP)."""

from __future__ import annotations

import base64
import json
import uuid

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def _name() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def apis(registry) -> dict[str, HfApi]:
    apis = {who: HfApi(endpoint=registry.url, token=tok) for who, tok in registry.tokens.items()}
    apis["anon"] = HfApi(endpoint=registry.url, token=False)
    return apis


def test_private_repos_are_invisible_without_the_owner_token(registry, apis, tmp_path):
    repo_id = apis["alice"].create_repo(_name(), private=True).repo_id
    apis["alice"].upload_file(path_or_fileobj=b"secret", path_in_repo="s.bin", repo_id=repo_id)
    assert apis["alice"].model_info(repo_id).private is True
    assert apis["read"].list_repo_files(repo_id) == ["s.bin"]  # alice's read-only token sees it
    for who in ("anon", "bob"):
        api = apis[who]
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(repo_id)
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files(repo_id)
        assert not api.repo_exists(repo_id)
        assert repo_id not in {m.id for m in api.list_models(author="alice")}
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "s.bin", token=registry.tokens.get(who, False), cache_dir=tmp_path / who)
        with pytest.raises(RepositoryNotFoundError):  # writes do not leak existence either
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=repo_id)
    assert repo_id in {m.id for m in apis["alice"].list_models(author="alice")}
    # Same answer for a private repo and a repo that does not exist.
    missing = httpx2.get(f"{registry.url}/api/models/alice/{_name()}")
    hidden = httpx2.get(f"{registry.url}/api/models/{repo_id}")
    assert (missing.status_code, missing.headers["x-error-code"]) == (
        hidden.status_code,
        hidden.headers["x-error-code"],
    )
    apis["alice"].update_repo_settings(repo_id, private=False)
    assert apis["anon"].list_repo_files(repo_id) == ["s.bin"]


def test_write_permissions(apis):
    repo_id = apis["alice"].create_repo(_name()).repo_id
    with pytest.raises(HfHubHTTPError) as e:  # bob cannot write into alice's namespace
        apis["bob"].upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=repo_id)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        apis["bob"].create_repo(f"alice/{_name()}")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError, match="read scope") as e:
        apis["read"].upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=repo_id)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        apis["anon"].create_tag(repo_id, tag="v1")
    assert e.value.response.status_code == 401
    assert (
        apis["bob"].whoami()["name"] == "bob"
        and apis["read"].whoami()["auth"]["accessToken"]["role"] == "read"
    )


def test_bad_tokens_get_a_clear_401(registry):
    bad = HfApi(endpoint=registry.url, token="not-a-real-token-at-all")
    with pytest.raises(HfHubHTTPError) as e:
        list(bad.list_models())
    assert e.value.response.status_code == 401 and "token create" in str(e.value)
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        bad.whoami()
    r = httpx2.get(f"{registry.url}/api/models", headers={"authorization": "Basic abc"})
    assert (
        r.status_code == 401 and r.headers["x-error-message"] == "Invalid credentials in Authorization header"
    )


def test_error_codes_map_to_client_exceptions(registry, apis, tmp_path):
    api = apis["alice"]
    repo_id = api.create_repo(_name()).repo_id
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"alice/{_name()}", "x.txt", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="deadbeefdead", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.txt", repo_id=repo_id)
    with pytest.raises(RevisionNotFoundError):  # commits never create branches
        api.upload_file(path_or_fileobj=b"x", path_in_repo="y.txt", repo_id=repo_id, revision="no-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="y.txt", repo_id=f"alice/{_name()}")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="no/such/dir"))
    r = httpx2.get(f"{registry.url}/api/nothing/here/at/all/x")
    assert r.status_code == 404 and r.headers["x-error-code"] == "NotFound"


def _commit_body(path: str) -> bytes:
    lines = [
        {"key": "header", "value": {"summary": "evil"}},
        {
            "key": "file",
            "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"},
        },
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "a\\b", ".git/config", "a//b", "./a", "sub/.git/x"]
)
def test_path_traversal_in_commits_is_rejected(registry, apis, path):
    repo_id = apis["alice"].create_repo(_name()).repo_id
    r = httpx2.post(
        f"{registry.url}/api/models/{repo_id}/commit/main",
        content=_commit_body(path),
        headers={
            "authorization": f"Bearer {registry.tokens['alice']}",
            "content-type": "application/x-ndjson",
        },
    )
    assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidPath", r.text
    assert apis["alice"].list_repo_files(repo_id) == []


@pytest.mark.parametrize(
    "url_path",
    [
        "/api/models/alice/..%2F..%2Fetc/tree/main",
        "/api/models/..%2Falice/x/tree/main",
        "/api/models/alice/%2E%2E/tree/main",
        "/api/models/alice/a%20b/revision/main",
        "/alice/..%2Fbob/resolve/main/x",
    ],
)
def test_bad_repo_ids_are_rejected(registry, url_path):
    r = httpx2.get(registry.url + url_path)
    assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidRepoId", r.text


def test_bad_paths_and_revisions_are_rejected(registry, apis):
    repo_id = apis["alice"].create_repo(_name()).repo_id
    auth = {"authorization": f"Bearer {registry.tokens['alice']}"}
    cases = [
        ("GET", f"/{repo_id}/resolve/main/..%2F..%2Frepo.json", "InvalidPath"),
        ("GET", f"/{repo_id}/resolve/main/a/../../x", "InvalidPath"),
        ("GET", f"/api/models/{repo_id}/revision/..%2F..%2Fmain", "InvalidRevision"),
        ("GET", f"/{repo_id}/resolve/..%2Fmain/x", "InvalidRevision"),
        ("POST", f"/api/models/{repo_id}/branch/..%2Fevil", "InvalidRevision"),
        ("POST", f"/api/models/{repo_id}/branch/.hidden", "InvalidRevision"),
    ]
    for method, path, code in cases:
        r = httpx2.request(method, registry.url + path, headers=auth, json={})
        assert (r.status_code, r.headers.get("x-error-code")) == (400, code), (path, r.text)
    with pytest.raises(HfHubHTTPError):  # the real client too
        apis["alice"].create_tag(repo_id, tag="../../v1")
