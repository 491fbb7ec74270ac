"""Read endpoints: repo info, listings, tree, paths-info, refs, commits, whoami and file downloads."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.responses import Response, StreamingResponse

from .context import Ctx, json_response
from .errors import HubError, entry_not_found
from .routing import Router
from .storage import RepoKey
from .trees import add_last_commits, list_tree, paths_info, sibling
from .validation import REPO_TYPES, check_path

logger = logging.getLogger(__name__)
REPO = "/api/{types}/{ns}/{name}"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TRUE = ("1", "true", "True")


def register(router: Router) -> None:
    """Add the read routes."""
    router.add("GET", "/healthz", healthz)
    router.add("GET", "/api/agent-harnesses", agent_harnesses)
    router.add("GET", "/api/whoami-v2", whoami)
    router.add("GET", "/api/{types}", list_repos)
    router.add("GET", REPO, repo_info)
    router.add("GET", REPO + "/revision/{*rev}", repo_info)
    router.add("GET", REPO + "/tree/{rev}/{*path}", tree)
    router.add("POST", REPO + "/paths-info/{*rev}", get_paths_info)
    router.add("GET", REPO + "/refs", refs)
    router.add("GET", REPO + "/commits/{*rev}", commits)
    router.add("GET", "/datasets/{ns}/{name}/resolve/{rev}/{*path}", resolve_dataset)
    router.add("GET", "/{ns}/{name}/resolve/{rev}/{*path}", resolve)


async def healthz(ctx: Ctx) -> Response:
    """Liveness probe."""
    return json_response({"status": "ok"})


async def agent_harnesses(ctx: Ctx) -> Response:
    """Answered so the client's telemetry side request succeeds quietly."""
    return json_response({"standardEnvVars": [], "harnesses": {}})


async def whoami(ctx: Ctx) -> Response:
    """`HfApi().whoami()`."""
    p = ctx.principal
    if p is None:
        raise HubError(401, "AuthRequired", "whoami needs a token (HF_TOKEN=... or token=...).")
    return json_response(
        {
            "type": "user",
            "id": p.user,
            "name": p.user,
            "fullname": p.user,
            "orgs": [{"type": "org", "name": o, "fullname": o} for o in p.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": p.token_id, "role": p.scope}},
        }
    )


def _bare_info(key: RepoKey, meta: dict[str, Any]) -> dict:
    """The listing entry of a repo whose revision or metadata cannot be read: id and visibility only."""
    info = {"_id": key.id, "id": key.id, "author": key.namespace, "private": bool(meta.get("private"))}
    return {**info, "tags": [], "createdAt": str(meta.get("createdAt", "")), "lastModified": ""}


def _info(ctx: Ctx, key: RepoKey, meta: dict[str, Any], cid: str, blobs: bool, full: bool = True) -> dict:
    """Repo info object as the Hub returns it."""
    commit = ctx.storage.get_commit(key, cid)
    md = ctx.hub.metadata(key, cid)
    files = ctx.storage.files(key, cid) if full else {}
    info: dict[str, Any] = {
        "_id": key.id,
        "id": key.id,
        "author": key.namespace,
        "sha": cid,
        "lastModified": commit["date"],
        "createdAt": meta["createdAt"],
        "private": meta["private"],
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": md["tags"],
    }
    if key.type == "model":
        info.update(modelId=key.id, library_name=md["library_name"], pipeline_tag=md["pipeline_tag"])
    if md["cardData"] is not None:
        info["cardData"] = md["cardData"]
    if full:
        info["siblings"] = [sibling(p, e, blobs) for p, e in sorted(files.items())]
        if blobs:
            info["usedStorage"] = sum(e["size"] for e in files.values())
    return info


async def repo_info(ctx: Ctx) -> Response:
    """`GET /api/models/{id}` and `/revision/{rev}` (`model_info`, `repo_info`, `snapshot_download`)."""
    key, meta = ctx.open_repo()
    resolved = await ctx.run(ctx.storage.resolve, key, ctx.params.get("rev") or "main")
    blobs = ctx.request.query_params.get("blobs") in _TRUE
    return json_response(await ctx.run(_info, ctx, key, meta, resolved.commit, blobs))


async def list_repos(ctx: Ctx) -> Response:
    """`GET /api/models` (`list_models`): search, author, filter (AND over tags), sort, limit, full, cardData."""
    rtype = REPO_TYPES.get(ctx.params["types"])
    if rtype is None:
        raise HubError(
            404, "NotFound", f"Unknown listing {ctx.params['types']!r}: use /api/models or /api/datasets."
        )
    q = ctx.request.query_params
    search, author = (q.get("search") or "").lower(), (q.get("author") or "").lower()
    filters = [f.lower() for f in q.getlist("filter")]
    full, card = q.get("full") in _TRUE, q.get("cardData") in _TRUE
    p = ctx.principal

    def collect() -> list[dict]:
        out = []
        for key, meta in ctx.storage.list_repos(rtype):
            if meta["private"] and not (p and p.can_read(key.namespace)):
                continue
            if (author and key.namespace.lower() != author) or (search and search not in key.id.lower()):
                continue
            try:
                head = ctx.storage.refs(key)["branches"]["main"]
                info = _info(ctx, key, meta, head, blobs=False, full=full)
                json.dumps(info, ensure_ascii=False).encode()  # text stored before paths had to be UTF-8
            except (HubError, FileNotFoundError):  # deleted meanwhile
                continue
            except Exception:  # one damaged repo must not break the listing for everyone
                logger.exception("listing %s: skipping its metadata", key.id)
                info = _bare_info(key, meta)
            tags = {t.lower() for t in info["tags"]}
            if all(f in tags for f in filters):
                if not card:
                    info.pop("cardData", None)
                out.append(info)
        return out

    items = await ctx.run(collect)
    sort = q.get("sort") or "id"
    if sort not in ("id", "lastModified", "createdAt", "downloads", "likes", "trendingScore"):
        raise HubError(
            400, "BadRequest", f"Unknown sort {sort!r}: use id, lastModified, createdAt, downloads or likes."
        )
    descending = sort != "id" if q.get("direction") is None else q.get("direction") == "-1"
    items.sort(key=lambda i: i.get(sort, 0), reverse=descending)
    if q.get("limit"):
        items = items[: _int(q.get("limit"), "limit")]
    return _paginated(ctx, items, ctx.hub.config.page_size)


def _int(value: str | None, name: str) -> int:
    try:
        n = int(value or 0)
    except ValueError:
        n = -1
    if n < 0:
        raise HubError(400, "BadRequest", f"Query parameter {name} must be a non-negative integer.")
    return n


def _paginated(ctx: Ctx, items: list, page_size: int) -> Response:
    """One page of `items`, with a GitHub-style `Link: <...>; rel="next"` header when more remain."""
    start = _int(ctx.request.query_params.get("cursor"), "cursor")
    page = items[start : start + page_size]
    headers = {}
    if start + page_size < len(items):
        query = [(k, v) for k, v in ctx.request.query_params.multi_items() if k != "cursor"]
        headers["Link"] = f'<{ctx.self_url(query + [("cursor", str(start + page_size))])}>; rel="next"'
    return json_response(page, headers=headers)


async def tree(ctx: Ctx) -> Response:
    """`GET .../tree/{rev}[/{path}]` (`list_repo_tree`, `list_repo_files`, `snapshot_download`)."""
    key, _ = ctx.open_repo()
    folder = ctx.params["path"].strip("/")
    if folder:
        check_path(folder)
    q = ctx.request.query_params
    recursive, expand = q.get("recursive") in _TRUE, q.get("expand") in _TRUE

    def listing() -> list[dict]:
        head = ctx.storage.resolve(key, ctx.params["rev"]).commit
        oid = functools.partial(ctx.storage.folder_oid, key, head)
        entries = list_tree(ctx.storage.files(key, head), folder, recursive, head, oid)
        if expand:
            add_last_commits(ctx.storage, key, head, entries)
        return _add_xet_hashes(ctx, key, entries)

    return _paginated(ctx, await ctx.run(listing), ctx.hub.config.page_size)


async def get_paths_info(ctx: Ctx) -> Response:
    """`POST .../paths-info/{rev}`, form-encoded (`paths=a&paths=b&expand=False`) or JSON."""
    key, _ = ctx.open_repo()
    body = await ctx.read_body()
    if ctx.request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise HubError(400, "BadRequest", "The request body must be a JSON object {'paths': [...]}.")
        paths, expand = data.get("paths", []), bool(data.get("expand"))
    else:
        form = parse_qs(body.decode("utf-8", "replace"))
        paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[0] in _TRUE
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise HubError(400, "BadRequest", "'paths' must be a list of path strings.")

    def info() -> list[dict]:
        head = ctx.storage.resolve(key, ctx.params["rev"]).commit
        oid = functools.partial(ctx.storage.folder_oid, key, head)
        entries = paths_info(ctx.storage.files(key, head), paths, oid)
        if expand:
            add_last_commits(ctx.storage, key, head, entries)
        return _add_xet_hashes(ctx, key, entries)

    return json_response(await ctx.run(info))


async def refs(ctx: Ctx) -> Response:
    """`GET .../refs` (`list_repo_refs`): branches, converts and tags (and pullRequests if asked)."""
    key, _ = ctx.open_repo()
    data = await ctx.run(ctx.storage.refs, key)
    out: dict[str, Any] = {
        "branches": [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
            for n, c in sorted(data["branches"].items())
        ],
        "converts": [],
        "tags": [
            {"name": n, "ref": f"refs/tags/{n}", "targetCommit": t["target"]}
            for n, t in sorted(data["tags"].items())
        ],
    }
    if ctx.request.query_params.get("include_prs") in _TRUE:
        out["pullRequests"] = []
    return json_response(out)


async def commits(ctx: Ctx) -> Response:
    """`GET .../commits/{rev}` (`list_repo_commits`), newest first, paginated."""
    key, _ = ctx.open_repo()
    page_size = min(ctx.hub.config.page_size, 50)
    wanted = _int(ctx.request.query_params.get("cursor"), "cursor") + page_size + 1  # +1: is there more?

    def history() -> list[dict]:
        head = ctx.storage.resolve(key, ctx.params["rev"] or "main").commit
        return [
            {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": c["author"]}],
            }
            for c in itertools.islice(ctx.storage.history(key, head), wanted)
        ]

    return _paginated(ctx, await ctx.run(history), page_size)


async def resolve_dataset(ctx: Ctx) -> Response:
    """`/datasets/{id}/resolve/...`."""
    ctx.params["type"] = "dataset"
    return await resolve(ctx)


async def resolve(ctx: Ctx) -> Response:
    """`HEAD`/`GET /{id}/resolve/{rev}/{path}` (`hf_hub_download`): metadata headers, content and Range."""
    ctx.params.setdefault("type", "model")
    key, _ = ctx.open_repo()
    path = check_path(ctx.params["path"])
    head = (await ctx.run(ctx.storage.resolve, key, ctx.params["rev"])).commit
    entry = await ctx.run(ctx.storage.entry, key, head, path)
    if entry is None:
        raise entry_not_found(path, head)
    size = entry["size"]
    etag = entry["sha256"] if entry["lfs"] else entry["sha1"]
    headers = {
        "X-Repo-Commit": head,
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if entry["lfs"]:
        headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        xet_hash = await ctx.run(ctx.storage.lfs_xet, key, entry["sha256"])
        if xet_hash:  # Xet clients download it through reconstruction; others read the bytes below
            refresh = f"{ctx.base_url()}/api/{key.type}s/{key.id}/xet-read-token/{head}"
            headers.update({"X-Xet-Hash": xet_hash, "Link": f'<{refresh}>; rel="xet-auth"'})
    start, end, status = 0, size, 200
    range_header = ctx.request.headers.get("range")
    if range_header and ctx.request.method == "GET":
        start, end = parse_range(range_header, size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if ctx.request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    blob = ctx.storage.blobs.path(entry["sha256"])
    return StreamingResponse(read_range(blob, start, end), status_code=status, headers=headers)


def _add_xet_hashes(ctx: Ctx, key: RepoKey, entries: list[dict]) -> list[dict]:
    """`xetHash` on the LFS entries stored through Xet (the client then skips the HEAD for them)."""
    for e in entries:
        lfs = e.get("lfs")
        xet_hash = ctx.storage.lfs_xet(key, lfs["oid"]) if lfs else None
        if xet_hash:
            e["xetHash"] = xet_hash
    return entries


def parse_range(value: str, size: int) -> tuple[int, int]:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` to a half-open interval (416 if unsatisfiable)."""
    m = _RANGE.match(value.strip())
    start = end = None
    if m and (m.group(1) or m.group(2)):
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
        else:
            start, end = max(size - int(m.group(2)), 0), size
    if start is None or end is None or start >= end or start >= size:
        raise HubError(
            416,
            "RangeNotSatisfiable",
            f"Range {value!r} cannot be served for a {size}-byte file; use one range 'bytes=start-[end]'.",
            {"Content-Range": f"bytes */{size}"},
        )
    return start, end


def read_range(path: Path, start: int, end: int, chunk: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """Stream `[start, end)` of a file (a blob, a xorb). The file is opened now, before any header is sent:
    a missing one is a 500 `BlobMissing` (logged) instead of a 200 whose body never comes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        logger.error("stored file %s is missing: run `adapterkit-registry fsck`", path)
        raise HubError(
            500,
            "BlobMissing",
            "A stored file of this repo is missing on the server; its operator should run fsck.",
        ) from None
    return _stream(fd, start, end, chunk)


async def _stream(fd: int, start: int, end: int, chunk: int) -> AsyncIterator[bytes]:
    try:
        pos = start
        while pos < end:
            data = os.pread(fd, min(chunk, end - pos), pos)
            if not data:
                break
            pos += len(data)
            yield data
    finally:
        os.close(fd)
