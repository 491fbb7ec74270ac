"""Repo moves (`HfApi.move_repo`: `POST /api/repos/move` `{"fromRepo", "toRepo", "type"}`).

The same rules as creating and deleting a repo: a write token for the namespaces of both ids; a
private repo the caller cannot read answers `RepoNotFound`, as one that does not exist; both ids are
validated; an existing destination (ids are case-insensitive) is `409 RepoExists`.

On disk a move is one `rename` of the repo folder, under the locks of both ids (taken in a fixed
order): the rename is the commit point, then `repo.json` gets the new id (a crash in between is
repaired at the next start, see `upkeep.recover`). History, tags, branches, LFS and Xet records move
with the folder; blobs and xorbs are shared by the whole root and do not move.

A move holds the root's maintenance lock shared: `gc` and `backup` (which hold it exclusively) list the
repos once and would take a folder renamed meanwhile for a deleted repo, collecting its blobs or leaving
it out of the copy. While one of them runs, a move is refused at once with 503 and `Retry-After`.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Any

from starlette.responses import Response

from .blobs import atomic_write_json, fsync_dir
from .context import Ctx, json_response
from .errors import HubError, bad_request, repo_not_found
from .flock import MAINTENANCE_LOCK, LockBusy, file_lock
from .routing import Router
from .storage import RepoKey, Storage
from .validation import check_repo_id

RETRY_AFTER_S = 60
"""Seconds a move refused during a gc or backup tells the client to wait (`Retry-After`)."""


def register(router: Router) -> None:
    """Add `POST /api/repos/move`."""
    router.add("POST", "/api/repos/move", move_repo)


def _key(value: Any, rtype: str, field: str) -> RepoKey:
    if not isinstance(value, str) or value.count("/") != 1:
        raise bad_request(f"{field} must be a repo id 'namespace/name', got {value!r}.", "InvalidRepoId")
    ns, name = value.split("/")
    check_repo_id(ns, name)
    return RepoKey(rtype, ns, name)


async def move_repo(ctx: Ctx) -> Response:
    """`POST /api/repos/move`: 200 `{"url"}` with the moved repo's new URL."""
    body = await ctx.json_body()
    rtype = body.get("type") or "model"
    if rtype not in ("model", "dataset"):
        raise bad_request(f"Repo type {rtype!r} is not supported by this registry: use model or dataset.")
    src, dst = _key(body.get("fromRepo"), rtype, "fromRepo"), _key(body.get("toRepo"), rtype, "toRepo")
    source = Ctx(ctx.hub, ctx.request, {"type": rtype, "ns": src.namespace, "name": src.name}, ctx.principal)
    src, _ = source.open_repo(write=True)  # 404 for a repo the caller cannot see, before any 401/403
    ctx.require_write(dst.namespace)
    if src.id == dst.id:
        raise bad_request(f"{src.id} is already called {dst.id}; pass another toRepo.", "InvalidRepoId")
    await ctx.run(move, ctx.storage, src, dst)
    return json_response({"url": ctx.repo_url(dst)})


def move(storage: Storage, src: RepoKey, dst: RepoKey) -> None:
    """Rename repo `src` to `dst` on disk.

    Raises:
        HubError: 404 `RepoNotFound` if `src` is gone, 409 `RepoExists` if `dst` exists (up to case,
            unless it is `src` itself: a change of case is a move), 503 `MaintenanceInProgress` while a
            gc or backup runs.
    """
    ordered = sorted({src, dst}, key=lambda k: (k.type, k.namespace.lower(), k.name.lower(), k.id))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(storage.root / MAINTENANCE_LOCK, blocking=False, shared=True))
        except LockBusy:
            raise HubError(
                503,
                "MaintenanceInProgress",
                f"Cannot move {src.id} now: a gc or backup of this registry is running (nothing was "
                "changed); retry the move when it has finished.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        for key in ordered:
            stack.enter_context(storage.lock(key))
        meta = storage.get_repo(src)
        if meta is None:
            raise repo_not_found(src.id)
        same = storage.find_repo_ignoring_case(dst)
        if same is not None and same != src:
            raise HubError(
                409,
                "RepoExists",
                f"Cannot move {src.id} to {dst.id}: {same.id} exists (repo ids are case-insensitive); "
                "delete it or choose another name.",
            )
        old, new = storage.repo_dir(src), storage.repo_dir(dst)
        new.parent.mkdir(parents=True, exist_ok=True)
        if new.exists() and same is None:  # leftover of a delete interrupted by a crash
            shutil.rmtree(new)
        old.rename(new)  # the commit point
        fsync_dir(new.parent)
        fsync_dir(old.parent)
        atomic_write_json(new / "repo.json", {**meta, "id": dst.id}, storage.tmp)
        storage.forget_cached()
