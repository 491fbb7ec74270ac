"""The HTML index page: families (repos) with their backbone, domains and per-domain metrics."""

from __future__ import annotations

import html
import logging
from importlib import resources
from string import Template
from typing import Any

from starlette.responses import HTMLResponse, Response

from .context import Ctx
from .errors import HubError
from .routing import Router
from .validation import URL_PREFIXES

logger = logging.getLogger(__name__)
_TEMPLATE = Template(
    resources.files(__package__).joinpath("templates/index.html").read_text(encoding="utf-8")
)


def register(router: Router) -> None:
    """Add the web route."""
    router.add("GET", "/", index)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _repo_html(row: dict[str, Any]) -> str:
    e = html.escape
    tags = "".join(f'<span class="tag">{e(t)}</span>' for t in row["tags"])
    parts = [
        '<div class="repo">',
        f"<h2>{e(row['id'])}{' (private)' if row['private'] else ''}</h2>",
        f'<p class="meta">{e(row["type"])} · updated {e(row["lastModified"])} · {tags}</p>',
    ]
    family = row["family"]
    if family:
        parts.append(f'<p class="meta">backbone: <code>{e(str(family["backbone"]))}</code></p>')
        metric_names = sorted({m for d in family["domains"] for m in d["metrics"]})
        head = "".join(f"<th>{e(m)}</th>" for m in metric_names)
        parts.append(f"<table><tr><th>domain</th><th>classes</th>{head}</tr>")
        for d in family["domains"]:
            cells = "".join(f"<td>{e(_fmt(d['metrics'].get(m, '')))}</td>" for m in metric_names)
            classes = "" if d["num_classes"] is None else d["num_classes"]
            parts.append(f"<tr><td>{e(d['name'])}</td><td>{e(str(classes))}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append("</div>")
    return "\n".join(parts)


async def index(ctx: Ctx) -> Response:
    """`GET /`: repos visible to the caller, newest first (`?search=` filters by id)."""
    search = (ctx.request.query_params.get("search") or "").strip()
    p = ctx.principal

    def rows() -> list[dict[str, Any]]:
        out = []
        for key, meta in ctx.storage.list_repos():
            if meta["private"] and not (p and p.can_read(key.namespace)):
                continue
            if search and search.lower() not in key.id.lower():
                continue
            try:
                head = ctx.storage.refs(key)["branches"]["main"]
                md, date = ctx.hub.metadata(key, head), ctx.storage.get_commit(key, head)["date"]
            except (HubError, FileNotFoundError):  # deleted meanwhile
                continue
            except Exception:  # one damaged repo must not break the page for everyone
                logger.exception("web page: skipping the metadata of %s", key.id)
                md, date = {"tags": [], "family": None}, ""
            out.append(
                {
                    "id": f"{URL_PREFIXES[key.type]}{key.id}",
                    "type": key.type,
                    "private": meta["private"],
                    "lastModified": date,
                    "tags": md["tags"],
                    "family": md["family"],
                }
            )
        return sorted(out, key=lambda r: r["lastModified"], reverse=True)

    found = await ctx.run(rows)
    body = _TEMPLATE.safe_substitute(
        count=len(found),
        endpoint=html.escape(ctx.base_url()),
        search=html.escape(search, quote=True),
        repos="\n".join(_repo_html(r) for r in found) or "<p>No repositories yet.</p>",
    )
    return HTMLResponse(body)
