"""The bad-input matrix: every malformed request gets the right status and `X-Error-Code`, never a
500, and leaves a registry that passes fsck. Each case runs against a real server on loopback."""

from __future__ import annotations

import base64
import http.client
import json
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from huggingface_hub import HfApi

TOKENS = {"alice": "alice-matrix-token-0123", "bob": "bob-matrix-token-0123", "read": "alice-matrix-read-01"}
REPO = "alice/m"
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A registry holding alice/m (a.txt, README.md, tag v1) and the private alice/p."""
    users = {
        TOKENS["alice"]: ("alice", "write"),
        TOKENS["bob"]: ("bob", "write"),
        TOKENS["read"]: ("alice", "read"),
    }
    root = tmp_path_factory.mktemp("matrix")
    with RegistryServer(root, tokens=users, max_upload_mb=1, lfs_threshold_mb=0.25) as server:
        api = HfApi(endpoint=server.url, token=TOKENS["alice"])
        api.create_repo(REPO)
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id=REPO)
        api.upload_file(path_or_fileobj=b"---\ntags: [t]\n---\n", path_in_repo="README.md", repo_id=REPO)
        api.create_tag(REPO, tag="v1")
        api.create_repo("alice/p", private=True)
        yield server


def nd(*lines: Any, header: Any = None) -> bytes:
    """An NDJSON commit body: a header line, then `lines` (dicts become `{"key": "file", ...}`)."""
    head = {"key": "header", "value": {"summary": "s"} if header is None else header}
    out = [head] + [
        x if isinstance(x, (dict, list, str)) and "key" in x else {"key": "file", "value": x} for x in lines
    ]
    return b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in out)


def file(path: Any = "f.txt", content: Any = None, **extra: Any) -> dict[str, Any]:
    value = {"path": path, "content": base64.b64encode(b"x").decode() if content is None else content}
    return {**value, **extra}


@dataclass
class Case:
    id: str
    method: str
    url: str
    status: int
    code: str | None
    body: bytes | None = None
    json: Any = None
    token: str | None = "alice"
    headers: dict[str, str] = field(default_factory=dict)


C = f"/api/models/{REPO}/commit/main"
LAUGHS = "---\na: &a [x, x]\nb: [*a, *a]\n---\n"
CASES = [
    # ----- commits: header and lines
    Case("summary-whitespace", "POST", C, 200, None, nd(file(), header={"summary": "   \n  "})),
    Case("summary-list", "POST", C, 400, "BadRequest", nd(file(), header={"summary": ["a"]})),
    Case(
        "description-dict",
        "POST",
        C,
        400,
        "BadRequest",
        nd(file(), header={"summary": "s", "description": {}}),
    ),
    Case("content-int", "POST", C, 400, "BadRequest", nd(file(content=123))),
    Case("content-list", "POST", C, 400, "BadRequest", nd(file(content=["eA=="]))),
    Case("content-not-base64", "POST", C, 400, "BadRequest", nd(file(content="!!!"))),
    Case("encoding-utf8", "POST", C, 400, "BadRequest", nd(file(encoding="utf-8"))),
    Case("path-null", "POST", C, 400, "InvalidPath", nd(file(path=None))),
    Case("path-list", "POST", C, 400, "InvalidPath", nd(file(path=["a"]))),
    Case("path-int", "POST", C, 400, "InvalidPath", nd(file(path=7))),
    Case("path-missing", "POST", C, 400, "InvalidPath", nd({"key": "file", "value": {"content": ""}})),
    Case("path-dotdot", "POST", C, 400, "InvalidPath", nd(file(path="../x"))),
    Case("path-absolute", "POST", C, 400, "InvalidPath", nd(file(path="/etc/passwd"))),
    Case("path-git", "POST", C, 400, "InvalidPath", nd(file(path="d/.git/config"))),
    Case("path-backslash", "POST", C, 400, "InvalidPath", nd(file(path="a\\b"))),
    # a lone surrogate (a JSON escape) cannot be encoded: stored, it broke every listing that showed it
    Case("path-lone-surrogate", "POST", C, 400, "InvalidPath", nd(file(path="a\ud800.txt"))),
    Case("summary-lone-surrogate", "POST", C, 400, "BadRequest", nd(file(), header={"summary": "\udc00"})),
    Case("path-nul", "POST", C, 400, "InvalidPath", nd(file(path="a\x00b"))),
    Case("path-empty", "POST", C, 400, "InvalidPath", nd(file(path=""))),
    Case("path-double-slash", "POST", C, 400, "InvalidPath", nd(file(path="a//b"))),
    Case("path-too-long", "POST", C, 400, "InvalidPath", nd(file(path="a" * 2000))),
    Case("path-file-under-file", "POST", C, 400, "InvalidPath", nd(file(path="a.txt/b"))),
    Case("line-deep-json", "POST", C, 400, "BadRequest", nd(DEEP)),
    Case("line-not-json", "POST", C, 400, "BadRequest", nd("{not json")),
    Case("line-value-list", "POST", C, 400, "BadRequest", nd({"key": "file", "value": [1]})),
    Case("line-key-int", "POST", C, 400, "BadRequest", nd({"key": 5, "value": {}})),
    Case("line-unknown-key", "POST", C, 400, "BadRequest", nd({"key": "symlink", "value": {}})),
    Case(
        "header-missing", "POST", C, 400, "BadRequest", json.dumps({"key": "file", "value": file()}).encode()
    ),
    Case("body-empty", "POST", C, 400, "BadRequest", b""),
    Case("header-deep", "POST", C, 400, "BadRequest", DEEP.encode()),
    Case(
        "lfs-bad-oid",
        "POST",
        C,
        400,
        "BadRequest",
        nd({"key": "lfsFile", "value": {"path": "x", "oid": "zz"}}),
    ),
    Case(
        "lfs-oid-int", "POST", C, 400, "BadRequest", nd({"key": "lfsFile", "value": {"path": "x", "oid": 5}})
    ),
    Case(
        "lfs-unknown",
        "POST",
        C,
        400,
        "LfsObjectMissing",
        nd({"key": "lfsFile", "value": {"path": "x", "oid": "a" * 64}}),
    ),
    Case(
        "delete-missing",
        "POST",
        C,
        404,
        "EntryNotFound",
        nd({"key": "deletedFile", "value": {"path": "nope"}}),
    ),
    Case(
        "delete-folder-missing",
        "POST",
        C,
        404,
        "EntryNotFound",
        nd({"key": "deletedFolder", "value": {"path": "d/"}}),
    ),
    Case(
        "delete-path-null", "POST", C, 400, "InvalidPath", nd({"key": "deletedFile", "value": {"path": None}})
    ),
    Case(
        "parent-not-hex",
        "POST",
        C,
        400,
        "InvalidRevision",
        nd(file(), header={"summary": "s", "parentCommit": "main"}),
    ),
    Case(
        "parent-int",
        "POST",
        C,
        400,
        "InvalidRevision",
        nd(file(), header={"summary": "s", "parentCommit": 5}),
    ),
    Case(
        "parent-stale",
        "POST",
        C,
        412,
        "ParentCommitMismatch",
        nd(file(), header={"summary": "s", "parentCommit": "0" * 40}),
    ),
    Case(
        "readme-aliases",
        "POST",
        C,
        400,
        "InvalidMetadata",
        nd(file("README.md", base64.b64encode(LAUGHS.encode()).decode())),
    ),
    Case(
        "readme-not-mapping",
        "POST",
        C,
        400,
        "InvalidMetadata",
        nd(file("README.md", base64.b64encode(b"---\n[1]\n---\n").decode())),
    ),
    Case(
        "readme-not-utf8",
        "POST",
        C,
        400,
        "InvalidMetadata",
        nd(file("README.md", base64.b64encode(b"---\na: \xff\n---\n").decode())),
    ),
    Case("missing-branch", "POST", f"/api/models/{REPO}/commit/nope", 404, "RevisionNotFound", nd(file())),
    Case("branch-traversal", "POST", f"/api/models/{REPO}/commit/..%2Fx", 400, "InvalidRevision", nd(file())),
    Case("create-pr", "POST", C + "?create_pr=1", 501, "PullRequestsNotSupported", nd(file())),
    Case(
        "content-type-text", "POST", C, 400, "BadRequest", nd(file()), headers={"content-type": "text/plain"}
    ),
    Case("anonymous", "POST", C, 401, "AuthRequired", nd(file()), token=None),
    Case("bad-token", "POST", C, 401, "InvalidCredentials", nd(file()), token="no-such-token-at-all"),
    Case("read-token", "POST", C, 403, "Forbidden", nd(file()), token="read"),
    Case("other-user", "POST", C, 403, "Forbidden", nd(file()), token="bob"),
    Case(
        "private-other-user",
        "POST",
        "/api/models/alice/p/commit/main",
        404,
        "RepoNotFound",
        nd(file()),
        token="bob",
    ),
    Case(
        "too-large",
        "POST",
        C,
        413,
        "PayloadTooLarge",
        nd(file(content=base64.b64encode(b"x" * (3 << 20)).decode())),
    ),
    Case(
        "content-length-too-large",
        "POST",
        C,
        413,
        "PayloadTooLarge",
        b"x",
        headers={"content-length": str(1 << 40)},
    ),
    Case(
        "inline-above-limit",
        "POST",
        C,
        413,
        "PayloadTooLarge",
        nd(file(content=base64.b64encode(b"x" * (600 << 10)).decode())),
    ),
    Case(
        "anon-huge-body",
        "POST",
        C,
        401,
        "AuthRequired",
        b"x" * 1024,
        token=None,
        headers={"content-length": str(300 << 20)},
    ),
    Case(
        "other-user-huge-body",
        "POST",
        C,
        403,
        "Forbidden",
        b"x" * 1024,
        token="bob",
        headers={"content-length": str(300 << 20)},
    ),
    Case(
        "json-huge-body",
        "POST",
        "/api/repos/create",
        413,
        "PayloadTooLarge",
        b"{",
        headers={"content-length": str(300 << 20)},
    ),
    # ----- repos
    Case("create-dotdot", "POST", "/api/repos/create", 400, "InvalidRepoId", json={"name": "a..b"}),
    Case("create-name-list", "POST", "/api/repos/create", 400, "InvalidRepoId", json={"name": ["x"]}),
    Case("create-case-duplicate", "POST", "/api/repos/create", 409, "RepoExists", json={"name": "M"}),
    Case(
        "create-type-space",
        "POST",
        "/api/repos/create",
        400,
        "BadRequest",
        json={"name": "s", "type": "space"},
    ),
    Case(
        "create-type-list",
        "POST",
        "/api/repos/create",
        400,
        "BadRequest",
        json={"name": "s", "type": ["model"]},
    ),
    Case("create-body-list", "POST", "/api/repos/create", 400, "BadRequest", json=[1]),
    Case("create-body-deep", "POST", "/api/repos/create", 400, "BadRequest", body=DEEP.encode()),
    Case("create-body-not-json", "POST", "/api/repos/create", 400, "BadRequest", body=b"name=x"),
    Case(
        "create-other-namespace",
        "POST",
        "/api/repos/create",
        403,
        "Forbidden",
        json={"name": "x", "organization": "bob"},
    ),
    Case("delete-missing-repo", "DELETE", "/api/repos/delete", 404, "RepoNotFound", json={"name": "nope"}),
    Case(
        "settings-visibility",
        "PUT",
        f"/api/models/{REPO}/settings",
        400,
        "BadRequest",
        json={"visibility": "weird"},
    ),
    Case("settings-gated", "PUT", f"/api/models/{REPO}/settings", 400, "BadRequest", json={"gated": "auto"}),
    # ----- branches and tags
    Case("branch-short-sha", "POST", f"/api/models/{REPO}/branch/abcdef1", 400, "InvalidRevision", json={}),
    Case("branch-full-sha", "POST", f"/api/models/{REPO}/branch/{'a' * 40}", 400, "InvalidRevision", json={}),
    Case("branch-head", "POST", f"/api/models/{REPO}/branch/HEAD", 400, "InvalidRevision", json={}),
    Case(
        "branch-refs-prefix",
        "POST",
        f"/api/models/{REPO}/branch/refs%2Fheads%2Fx",
        400,
        "InvalidRevision",
        json={},
    ),
    Case("branch-dot", "POST", f"/api/models/{REPO}/branch/.x", 400, "InvalidRevision", json={}),
    Case(
        "branch-start-bad",
        "POST",
        f"/api/models/{REPO}/branch/b1",
        400,
        "InvalidRevision",
        json={"startingPoint": "../x"},
    ),
    Case(
        "branch-start-missing",
        "POST",
        f"/api/models/{REPO}/branch/b2",
        404,
        "RevisionNotFound",
        json={"startingPoint": "nope"},
    ),
    Case("branch-delete-main", "DELETE", f"/api/models/{REPO}/branch/main", 400, "BadRequest"),
    Case(
        "tag-numeric", "POST", f"/api/models/{REPO}/tag/main", 400, "InvalidRevision", json={"tag": "1234567"}
    ),
    Case("tag-int", "POST", f"/api/models/{REPO}/tag/main", 400, "BadRequest", json={"tag": 5}),
    Case(
        "tag-message-dict",
        "POST",
        f"/api/models/{REPO}/tag/main",
        400,
        "BadRequest",
        json={"tag": "t2", "message": {}},
    ),
    Case("tag-duplicate", "POST", f"/api/models/{REPO}/tag/main", 409, "RefExists", json={"tag": "v1"}),
    Case("tag-shadow-branch", "POST", f"/api/models/{REPO}/tag/main", 409, "RefExists", json={"tag": "main"}),
    Case("tag-delete-missing", "DELETE", f"/api/models/{REPO}/tag/nope", 404, "RevisionNotFound"),
    # ----- preupload and LFS
    Case(
        "preupload-files-dict",
        "POST",
        f"/api/models/{REPO}/preupload/main",
        400,
        "BadRequest",
        json={"files": {}},
    ),
    Case(
        "preupload-path-null",
        "POST",
        f"/api/models/{REPO}/preupload/main",
        400,
        "InvalidPath",
        json={"files": [{"path": None, "size": 1}]},
    ),
    Case(
        "preupload-size-negative",
        "POST",
        f"/api/models/{REPO}/preupload/main",
        400,
        "BadRequest",
        json={"files": [{"path": "x", "size": -1}]},
    ),
    Case(
        "preupload-size-bool",
        "POST",
        f"/api/models/{REPO}/preupload/main",
        400,
        "BadRequest",
        json={"files": [{"path": "x", "size": True}]},
    ),
    Case(
        "preupload-too-large",
        "POST",
        f"/api/models/{REPO}/preupload/main",
        413,
        "PayloadTooLarge",
        json={"files": [{"path": "x", "size": 1 << 30}]},
    ),
    Case(
        "lfs-objects-int",
        "POST",
        f"/{REPO}.git/info/lfs/objects/batch",
        400,
        "BadRequest",
        json={"operation": "upload", "objects": 5},
    ),
    Case(
        "lfs-object-bad",
        "POST",
        f"/{REPO}.git/info/lfs/objects/batch",
        400,
        "BadRequest",
        json={"operation": "upload", "objects": [{"oid": 1, "size": 1}]},
    ),
    Case(
        "lfs-download",
        "POST",
        f"/{REPO}.git/info/lfs/objects/batch",
        400,
        "BadRequest",
        json={"operation": "download", "objects": []},
    ),
    Case(
        "lfs-put-unsigned",
        "PUT",
        f"/api/lfs-upload/model/{REPO}/{'a' * 64}?size=1&exp=9999999999&user=alice&sig=0",
        403,
        "InvalidSignature",
        body=b"x",
        token=None,
    ),
    Case(
        "lfs-verify-missing",
        "POST",
        f"/{REPO}.git/info/lfs/objects/verify",
        404,
        "LfsObjectMissing",
        json={"oid": "b" * 64, "size": 1},
    ),
    # ----- reads
    Case("resolve-traversal", "GET", f"/{REPO}/resolve/main/..%2Frepo.json", 400, "InvalidPath", token=None),
    Case("resolve-bad-rev", "GET", f"/{REPO}/resolve/..%2Fmain/a.txt", 400, "InvalidRevision", token=None),
    Case("resolve-missing", "GET", f"/{REPO}/resolve/main/nope", 404, "EntryNotFound", token=None),
    Case(
        "resolve-bad-range",
        "GET",
        f"/{REPO}/resolve/main/a.txt",
        416,
        "RangeNotSatisfiable",
        token=None,
        headers={"range": "bytes=99-"},
    ),
    Case("resolve-bad-utf8", "GET", f"/{REPO}/resolve/main/%ff", 400, "InvalidPath", token=None),
    Case("info-missing-rev", "GET", f"/api/models/{REPO}/revision/nope", 404, "RevisionNotFound", token=None),
    Case("info-private-anon", "GET", "/api/models/alice/p", 404, "RepoNotFound", token=None),
    Case(
        "tree-missing-folder", "GET", f"/api/models/{REPO}/tree/main/nope", 404, "EntryNotFound", token=None
    ),
    Case("tree-traversal", "GET", f"/api/models/{REPO}/tree/main/..%2F..", 400, "InvalidPath", token=None),
    Case(
        "paths-info-list",
        "POST",
        f"/api/models/{REPO}/paths-info/main",
        400,
        "BadRequest",
        json=[1],
        token=None,
    ),
    Case(
        "paths-info-int",
        "POST",
        f"/api/models/{REPO}/paths-info/main",
        400,
        "BadRequest",
        json={"paths": 5},
        token=None,
    ),
    Case(
        "paths-info-deep",
        "POST",
        f"/api/models/{REPO}/paths-info/main",
        400,
        "BadRequest",
        body=DEEP.encode(),
        token=None,
        headers={"content-type": "application/json"},
    ),
    Case(
        "commits-missing-rev", "GET", f"/api/models/{REPO}/commits/nope", 404, "RevisionNotFound", token=None
    ),
    Case("list-bad-sort", "GET", "/api/models?sort=bogus", 400, "BadRequest", token=None),
    Case("list-bad-limit", "GET", "/api/models?limit=-1", 400, "BadRequest", token=None),
    Case("list-bad-cursor", "GET", "/api/models?cursor=x", 400, "BadRequest", token=None),
    Case("list-bad-type", "GET", "/api/spaces", 404, "NotFound", token=None),
    Case("unknown-endpoint", "GET", "/api/nothing/here/at/all/x/y", 404, "NotFound", token=None),
    Case("method-not-allowed", "PATCH", f"/api/models/{REPO}", 405, "MethodNotAllowed", token=None),
    Case("whoami-anon", "GET", "/api/whoami-v2", 401, "AuthRequired", token=None),
    # ----- Xet: token endpoints and the CAS API (hashes, tokens and signatures are checked first)
    Case(
        "xet-write-anon", "GET", f"/api/models/{REPO}/xet-write-token/main", 401, "AuthRequired", token=None
    ),
    Case(
        "xet-write-read-token",
        "GET",
        f"/api/models/{REPO}/xet-write-token/main",
        403,
        "Forbidden",
        token="read",
    ),
    Case(
        "xet-write-other-user",
        "GET",
        f"/api/models/{REPO}/xet-write-token/main",
        403,
        "Forbidden",
        token="bob",
    ),
    Case("xet-write-no-branch", "GET", f"/api/models/{REPO}/xet-write-token/nope", 404, "RevisionNotFound"),
    Case(
        "xet-write-pr",
        "GET",
        f"/api/models/{REPO}/xet-write-token/main?create_pr=1",
        501,
        "PullRequestsNotSupported",
    ),
    Case(
        "xet-read-private-anon",
        "GET",
        "/api/models/alice/p/xet-read-token/main",
        404,
        "RepoNotFound",
        token=None,
    ),
    Case(
        "xet-read-private-bob",
        "GET",
        "/api/models/alice/p/xet-read-token/main",
        404,
        "RepoNotFound",
        token="bob",
    ),
    Case(
        "xet-read-no-rev",
        "GET",
        f"/api/models/{REPO}/xet-read-token/nope",
        404,
        "RevisionNotFound",
        token=None,
    ),
    Case("xet-read-space", "GET", f"/api/spaces/{REPO}/xet-read-token/main", 404, "RepoNotFound", token=None),
    Case(
        "xet-xorb-no-token",
        "POST",
        f"/v1/xorbs/default/{'a' * 64}",
        401,
        "XetTokenRequired",
        body=b"x",
        token=None,
    ),
    Case("xet-xorb-hub-token", "POST", f"/v1/xorbs/default/{'a' * 64}", 401, "XetTokenRequired", body=b"x"),
    Case(
        "xet-xorb-forged",
        "POST",
        f"/v1/xorbs/default/{'a' * 64}",
        401,
        "InvalidXetToken",
        body=b"x",
        token="xet_e30.00",
    ),
    Case("xet-xorb-bad-hash", "POST", "/v1/xorbs/default/XYZ", 400, "InvalidHash", body=b"x", token=None),
    Case(
        "xet-xorb-upper-hash",
        "POST",
        f"/v1/xorbs/default/{'A' * 64}",
        400,
        "InvalidHash",
        body=b"x",
        token=None,
    ),
    Case(
        "xet-xorb-prefix", "POST", f"/v1/xorbs/other/{'a' * 64}", 400, "InvalidPrefix", body=b"x", token=None
    ),
    Case("xet-shard-no-token", "POST", "/v1/shards", 401, "XetTokenRequired", body=b"x", token=None),
    Case("xet-recon-no-token", "GET", f"/v1/reconstructions/{'a' * 64}", 401, "XetTokenRequired", token=None),
    Case("xet-recon-bad-hash", "GET", f"/v1/reconstructions/{'g' * 64}", 400, "InvalidHash", token=None),
    Case(
        "xet-chunk-no-token",
        "GET",
        f"/v1/chunks/default-merkledb/{'a' * 64}",
        401,
        "XetTokenRequired",
        token=None,
    ),
    Case(
        "xet-xorb-get-unsigned", "GET", f"/v1/xorbs/default/{'a' * 64}", 403, "InvalidSignature", token=None
    ),
    Case(
        "xet-xorb-get-forged",
        "GET",
        f"/v1/xorbs/default/{'a' * 64}?exp=9999999999&sig={'0' * 64}",
        403,
        "InvalidSignature",
        token=None,
    ),
    Case(
        "xet-grants", "POST", f"/v1/xorb-grants/default/{'a' * 64}", 404, "NotFound", body=b"{}", token=None
    ),
    Case("validate-yaml-aliases", "POST", "/api/validate-yaml", 400, "InvalidYaml", json={"content": LAUGHS}),
    Case("validate-yaml-deep", "POST", "/api/validate-yaml", 400, "InvalidYaml", body=DEEP.encode()),
]


def _send_raw(srv, case: Case, headers: dict[str, str]) -> httpx2.Response:
    """Send headers (e.g. a lying Content-Length) and a short body, then read the answer at once."""
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest(case.method, case.url)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders(case.body)
    resp = conn.getresponse()
    out = httpx2.Response(resp.status, headers=resp.getheaders(), content=resp.read())
    conn.close()
    return out


def _send(srv, case: Case) -> httpx2.Response:
    headers = dict(case.headers)
    if case.token:
        headers["authorization"] = f"Bearer {TOKENS.get(case.token, case.token)}"
    if "content-length" in headers:
        return _send_raw(srv, case, headers)
    if case.json is not None:
        return httpx2.request(case.method, srv.url + case.url, json=case.json, headers=headers, timeout=60)
    if case.body is not None and "content-type" not in headers and "/commit/" in case.url:
        headers["content-type"] = "application/x-ndjson"
    return httpx2.request(case.method, srv.url + case.url, content=case.body, headers=headers, timeout=60)


def test_matrix_is_large_and_ids_are_unique():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(srv, case):
    r = _send(srv, case)
    assert r.status_code == case.status, (r.status_code, r.headers.get("x-error-code"), r.text[:300])
    assert r.headers.get("x-error-code") == case.code
    if case.code and case.method != "HEAD" and case.code != "InvalidYaml":
        assert "\n" not in r.headers["x-error-message"] and r.json()["error"]
    assert fsck(Storage(srv.root, create=False), deep=False) == []


def test_repo_ids_differing_in_case_are_one_repo(srv):
    api = HfApi(endpoint=srv.url, token=TOKENS["alice"])
    assert api.model_info("alice/M").id == REPO and api.model_info("ALICE/m").sha == api.model_info(REPO).sha
    assert api.create_repo("alice/M", exist_ok=True).repo_id == REPO  # 409 with the existing repo's url
    r = httpx2.get(f"{srv.url}/Alice/M/resolve/main/a.txt")
    assert r.status_code == 200 and r.content == b"hello"
    hidden = httpx2.get(f"{srv.url}/api/models/alice/P")  # the private repo stays hidden from others
    assert (hidden.status_code, hidden.headers["x-error-code"]) == (404, "RepoNotFound")
    assert HfApi(endpoint=srv.url, token=TOKENS["alice"]).model_info("alice/P").id == "alice/p"
