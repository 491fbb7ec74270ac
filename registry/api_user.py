"""Per-user listings: `GET /api/settings/repositories` (`list_user_repos`, `hf repos ls`)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response

from .context import Ctx, json_response
from .errors import HubError
from .routing import Router

logger = logging.getLogger(__name__)


def register(router: Router) -> None:
    """Add the per-user routes."""
    router.add("GET", "/api/settings/repositories", repositories)
    router.add("GET", "/api/organizations/{ns}/settings/repositories", repositories)


async def repositories(ctx: Ctx) -> Response:
    """Repos of the caller's user (or of an organisation it belongs to) with their storage.

    `storage` is the size of the files at the head of `main`; blobs shared between revisions and repos
    are stored once, so there is no per-repo total to report.
    """
    p = ctx.principal
    if p is None:
        raise HubError(401, "AuthRequired", "Listing your repos needs a token (HF_TOKEN=... or token=...).")
    namespace = ctx.params.get("ns") or p.user
    if not p.can_read(namespace):
        raise HubError(403, "Forbidden", f"Token of {p.user!r} cannot list the repos of {namespace!r}.")

    def collect() -> list[dict[str, Any]]:
        out = []
        for key, meta in ctx.storage.list_repos():
            if key.namespace != namespace:
                continue
            try:
                head = ctx.storage.refs(key)["branches"]["main"]
                files, date = ctx.storage.files(key, head), ctx.storage.get_commit(key, head)["date"]
            except (HubError, FileNotFoundError):  # deleted meanwhile
                continue
            except Exception:  # a damaged repo is listed without its storage figure
                logger.exception("listing %s: cannot read its head", key.id)
                files, date = {}, meta.get("createdAt", "")
            used = sum(e["size"] for e in files.values())
            visibility = "private" if meta.get("private") else "public"
            out.append(
                {"id": key.id, "type": key.type, "updatedAt": date, "visibility": visibility, "storage": used}
            )
        total = sum(r["storage"] for r in out) or 1
        for r in out:
            r["storagePercent"] = round(100 * r["storage"] / total, 2)
        return out

    return json_response(await ctx.run(collect))
