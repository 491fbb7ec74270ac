"""Write endpoints: repos, README validation, preupload, NDJSON commits, tags and branches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from starlette.responses import Response

from . import lfsrules, refs
from .cards import parse_front_matter
from .commitbody import header_text, parse_commit
from .context import MB, Ctx, json_response
from .errors import HubError, bad_request, revision_not_found, too_large
from .routing import Router
from .storage import RepoKey
from .validation import check_path, check_ref_name, check_repo_id

REPO = "/api/{types}/{ns}/{name}"
_TRUE = ("1", "true", "True")


def register(router: Router) -> None:
    """Add the write routes."""
    router.add("POST", "/api/repos/create", create_repo)
    router.add("DELETE", "/api/repos/delete", delete_repo)
    router.add("POST", "/api/validate-yaml", validate_yaml)
    router.add("PUT", REPO + "/settings", settings)
    router.add("POST", REPO + "/preupload/{*rev}", preupload)
    router.add("POST", REPO + "/commit/{*rev}", commit)
    router.add("POST DELETE", REPO + "/tag/{*rev}", tag)
    router.add("POST DELETE", REPO + "/branch/{*branch}", branch)


def _repo_from_body(ctx: Ctx, body: dict[str, Any]) -> RepoKey:
    """Repo of a create/delete request; the namespace defaults to the token's user."""
    rtype = body.get("type") or "model"
    if rtype not in ("model", "dataset"):
        raise bad_request(f"Repo type {rtype!r} is not supported by this registry: use model or dataset.")
    p = ctx.require_write(str(body.get("organization") or (ctx.principal.user if ctx.principal else "")))
    name, ns = str(body.get("name") or ""), str(body.get("organization") or p.user)
    check_repo_id(ns, name)
    return RepoKey(rtype, ns, name)


async def create_repo(ctx: Ctx) -> Response:
    """`POST /api/repos/create`: 200 or 409, both with the repo `url`."""
    body = await ctx.json_body()
    key = _repo_from_body(ctx, body)
    private = body.get("visibility") == "private" or body.get("private") is True
    url = ctx.repo_url(key)
    try:
        await ctx.run(ctx.storage.create_repo, key, ctx.principal.user, private)
    except HubError as e:
        if e.status != 409:
            raise
        existing = e.headers.get("X-Existing-Repo", key.id).split("/")
        url = ctx.repo_url(RepoKey(key.type, *existing))
        return json_response(
            {"error": e.message, "url": url}, 409, {"X-Error-Code": e.code, "X-Error-Message": e.message}
        )
    return json_response({"url": url, "name": key.id, "id": key.id})


async def delete_repo(ctx: Ctx) -> Response:
    """`DELETE /api/repos/delete`."""
    key = _repo_from_body(ctx, await ctx.json_body())
    await ctx.run(ctx.storage.delete_repo, key)
    return json_response({})


async def settings(ctx: Ctx) -> Response:
    """`PUT .../settings` (`update_repo_settings`): only the visibility (`private` / `visibility`)."""
    key, _ = ctx.open_repo(write=True)
    body = await ctx.json_body()
    if body.get("gated") not in (None, False):
        raise bad_request("Gated repos are not supported by this registry; use private repos and tokens.")
    visibility = body.get("visibility")
    if visibility not in (None, "public", "private"):
        raise bad_request(f"Visibility {visibility!r} is not supported: use 'public' or 'private'.")
    private = visibility == "private" if visibility is not None else body.get("private")
    if private is not None:
        await ctx.run(ctx.storage.set_private, key, bool(private))
    return json_response({})


async def validate_yaml(ctx: Ctx) -> Response:
    """`POST /api/validate-yaml`: always answers JSON (the client parses it before checking the status)."""
    try:
        body = await ctx.json_body()
        parse_front_matter(str(body.get("content") or ""))
    except (ValueError, yaml.YAMLError, HubError) as e:
        msg = e.message if isinstance(e, HubError) else str(e)
        return json_response(
            {"errors": [{"message": f"Invalid YAML front matter: {msg}"}], "warnings": []},
            400,
            {"X-Error-Code": "InvalidYaml", "X-Error-Message": "Invalid YAML front matter in README.md"},
        )
    return json_response({"errors": [], "warnings": []})


def _branch_for_write(ctx: Ctx, key: RepoKey) -> str:
    """The branch a preupload/commit targets (404 `RevisionNotFound` if it does not exist)."""
    if ctx.request.query_params.get("create_pr") in _TRUE:
        raise HubError(
            501, "PullRequestsNotSupported", "Pull requests are not supported; commit to a branch."
        )
    rev = check_ref_name(ctx.params["rev"] or "main")
    name = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
    if name not in ctx.storage.refs(key)["branches"]:
        raise revision_not_found(rev, "Commits go to existing branches; create it first with create_branch.")
    return name


async def preupload(ctx: Ctx) -> Response:
    """`POST .../preupload/{rev}`: upload mode per file, and the remote oid so unchanged files are skipped."""
    key, _ = ctx.open_repo(write=True)
    branch = _branch_for_write(ctx, key)
    body = await ctx.json_body()
    files = body.get("files")
    if not isinstance(files, list):
        raise bad_request("The preupload body must be {'files': [{'path', 'size', 'sample'}, ...]}.")
    cfg = ctx.hub.config
    head = ctx.storage.refs(key)["branches"][branch]
    rules = await ctx.run(_lfs_rules, ctx, key, head)
    checked = []
    for f in files:
        if not isinstance(f, dict):
            raise bad_request("Each preupload entry must be {'path', 'size', 'sample'}.")
        path, size = f.get("path"), f.get("size")
        if not isinstance(path, str):
            raise bad_request("Each preupload entry needs a string 'path'.", "InvalidPath")
        path = check_path(path)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request(f"Invalid size for {path!r}: expected a non-negative integer.")
        if size > cfg.max_upload_bytes:
            raise too_large(size, cfg.max_upload_bytes)
        mode = "lfs" if size > cfg.lfs_threshold_bytes or lfsrules.is_lfs(path, rules) else "regular"
        checked.append((path, mode))

    def answer() -> list[dict[str, Any]]:
        out = []
        for path, mode in checked:
            existing = ctx.storage.entry(key, head, path)
            oid = None if existing is None else existing["sha256"] if mode == "lfs" else existing["sha1"]
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return out

    return json_response({"files": await ctx.run(answer), "commitOid": head})


def _lfs_rules(ctx: Ctx, key: RepoKey, head: str) -> list[lfsrules.Rule]:
    """LFS rules of the branch head: its `.gitattributes`, else the defaults of the repo type."""
    entry = ctx.storage.entry(key, head, ".gitattributes")
    if entry is None:
        return lfsrules.default_rules(key.type)
    if entry["size"] > lfsrules.MAX_GITATTRIBUTES_BYTES:
        return []
    data = ctx.storage.blobs.path(entry["sha256"]).read_bytes()
    return lfsrules.parse_rules(data.decode("utf-8", "replace"))


async def _spool(ctx: Ctx, limit: int) -> Path:
    """Stream the request body into a temporary file; 413 (connection closed, nothing kept) above `limit`."""
    ctx.check_length(limit)
    f, tmp = ctx.storage.blobs.new_temp()
    total = 0
    try:
        with f:
            async for chunk in ctx.request.stream():
                total += len(chunk)
                if total > limit:
                    err = too_large(total, limit)
                    err.headers["Connection"] = "close"
                    raise err
                f.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


async def commit(ctx: Ctx) -> Response:
    """`POST .../commit/{rev}` with an NDJSON body (`create_commit`, `upload_file`, `upload_folder`)."""
    key, _ = ctx.open_repo(write=True)
    branch = _branch_for_write(ctx, key)
    if "json" not in ctx.request.headers.get("content-type", "application/x-ndjson"):
        raise bad_request("Send the commit as application/x-ndjson.")
    spool = await _spool(ctx, ctx.hub.config.max_upload_bytes * 4 // 3 + MB)
    try:
        header, ops = await ctx.run(parse_commit, ctx.storage, ctx.hub.config, key, spool)
        for op, path, entry in ops:  # parse a new card outside the repo lock; the commit reuses it
            if op == "add" and path == "README.md" and entry is not None:
                await ctx.run(ctx.storage.meta.check_card, entry)
    finally:
        spool.unlink(missing_ok=True)
    lines = header_text(header, "summary", "").strip().splitlines()
    title = lines[0].strip()[:1000] if lines else ""
    cid = await ctx.run(
        ctx.storage.commit,
        key,
        branch,
        ops,
        ctx.principal.user,
        title or "Commit",
        header_text(header, "description", ""),
        header.get("parentCommit"),
    )
    url = f"{ctx.repo_url(key)}/commit/{cid}"
    return json_response(
        {"success": True, "commitOid": cid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}
    )


async def tag(ctx: Ctx) -> Response:
    """`POST .../tag/{rev}` `{"tag", "message"}` creates a tag; `DELETE .../tag/{tag}` deletes it."""
    key, _ = ctx.open_repo(write=True)
    if ctx.request.method == "DELETE":
        await ctx.run(refs.set_tag, ctx.storage, key, ctx.params["rev"], None, None, False)
        return json_response({})
    body = await ctx.json_body()
    name, message = body.get("tag"), body.get("message")
    if not isinstance(name, str) or not isinstance(message, (str, type(None))):
        raise bad_request("The tag body must be {'tag': 'v1', 'message': '...'}.")
    await ctx.run(refs.set_tag, ctx.storage, key, name, ctx.params["rev"] or "main", message, True)
    return json_response({})


async def branch(ctx: Ctx) -> Response:
    """`POST .../branch/{name}` `{"startingPoint"?}` creates a branch; `DELETE` deletes it."""
    key, _ = ctx.open_repo(write=True)
    name = ctx.params["branch"]
    if ctx.request.method == "DELETE":
        await ctx.run(refs.set_branch, ctx.storage, key, name, None, False)
        return json_response({})
    body = await ctx.json_body()
    start = body.get("startingPoint")
    if start is not None:
        start = check_ref_name(str(start))
    await ctx.run(refs.set_branch, ctx.storage, key, name, start, True)
    return json_response({})
