"""Classic git-LFS batch API ("basic" transfer) for files above the LFS threshold.

The client PUTs the bytes to the `href` of the batch answer *without* an `Authorization` header,
so that URL carries an HMAC signature (repo, oid, size, expiry, user) instead. The verify step is
authenticated as usual. An object is only usable by a commit of the repo it was uploaded to.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from starlette.responses import JSONResponse, Response

from .blobs import BlobInfo, git_blob_sha1
from .context import Ctx, json_response
from .errors import HubError, bad_request, repo_not_found, too_large
from .routing import Router
from .storage import RepoKey
from .validation import URL_PREFIXES, check_repo_id, is_hex

LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"


def register(router: Router) -> None:
    """Add the LFS routes."""
    router.add("POST", "/datasets/{ns}/{name}.git/info/lfs/objects/batch", batch_dataset)
    router.add("POST", "/{ns}/{name}.git/info/lfs/objects/batch", batch)
    router.add("POST", "/datasets/{ns}/{name}.git/info/lfs/objects/verify", verify_dataset)
    router.add("POST", "/{ns}/{name}.git/info/lfs/objects/verify", verify)
    router.add("PUT", "/api/lfs-upload/{type}/{ns}/{name}/{oid}", upload)


def _object(obj: Any, max_size: int) -> tuple[str, int]:
    if not isinstance(obj, dict):
        raise bad_request("Each LFS object must be {'oid': <sha256 hex>, 'size': <int>}.")
    oid, size = obj.get("oid"), obj.get("size")
    if not isinstance(oid, str) or not is_hex(oid, 64, 64) or not isinstance(size, int) or size < 0:
        raise bad_request("Each LFS object must be {'oid': <sha256 hex>, 'size': <int>}.")
    if size > max_size:
        raise too_large(size, max_size)
    return oid, size


async def batch_dataset(ctx: Ctx) -> Response:
    """Batch endpoint of a dataset repo."""
    ctx.params["type"] = "dataset"
    return await batch(ctx)


async def batch(ctx: Ctx) -> Response:
    """`POST /{id}.git/info/lfs/objects/batch`: signed upload URLs for objects this repo lacks."""
    ctx.params.setdefault("type", "model")
    key, _ = ctx.open_repo(write=True)
    body = await ctx.json_body()
    if body.get("operation") != "upload":
        raise bad_request("Only the LFS 'upload' operation is supported; download files through /resolve.")
    if body.get("hash_algo", "sha256") != "sha256":
        raise bad_request("Only hash_algo 'sha256' is supported.")
    cfg, user = ctx.hub.config, ctx.principal.user
    expires = int(time.time()) + cfg.signed_url_ttl_s
    base = ctx.base_url()
    out = []
    objects = body.get("objects")
    if not isinstance(objects, list):
        raise bad_request("The LFS batch body needs 'objects': [{'oid': <sha256 hex>, 'size': <int>}, ...].")
    for obj in objects:
        oid, size = _object(obj, cfg.max_upload_bytes)
        if await ctx.run(ctx.storage.lfs_object, key, oid) is not None:
            out.append({"oid": oid, "size": size})  # already here: the client skips the upload
            continue
        sig = ctx.hub.signer.sign(key.type, key.id, oid, str(size), str(expires), user)
        href = (
            f"{base}/api/lfs-upload/{key.type}/{key.id}/{oid}?size={size}&exp={expires}&user={user}&sig={sig}"
        )
        verify_href = f"{base}/{URL_PREFIXES[key.type]}{key.id}.git/info/lfs/objects/verify"
        out.append(
            {
                "oid": oid,
                "size": size,
                "authenticated": True,
                "actions": {
                    "upload": {"href": href, "expires_in": cfg.signed_url_ttl_s},
                    "verify": {"href": verify_href},
                },
            }
        )
    return JSONResponse({"transfer": "basic", "objects": out}, media_type=LFS_MEDIA_TYPE)


async def upload(ctx: Ctx) -> Response:
    """`PUT /api/lfs-upload/...?sig=...`: stream the object to a temp file, check size and sha256, store it."""
    p, q = ctx.params, ctx.request.query_params
    rtype, oid = p["type"], p["oid"]
    size_s, exp_s, user, sig = q.get("size", ""), q.get("exp", ""), q.get("user", ""), q.get("sig", "")
    check_repo_id(p["ns"], p["name"])
    key = RepoKey(rtype, p["ns"], p["name"])
    signed = ctx.hub.signer.verify(sig, rtype, key.id, oid, size_s, exp_s, user)
    if not signed or not exp_s.isdigit() or not size_s.isdigit():
        raise HubError(
            403, "InvalidSignature", "Invalid upload URL signature; request a new URL from the batch API."
        )
    if int(exp_s) < time.time():
        raise HubError(
            403, "ExpiredSignature", "This upload URL has expired; request a new one from the batch API."
        )
    if ctx.storage.get_repo(key) is None:
        raise repo_not_found(key.id)
    size = int(size_s)
    if size > ctx.hub.config.max_upload_bytes:
        raise too_large(size, ctx.hub.config.max_upload_bytes)
    ctx.check_length(size)  # a body declared larger than the signed size is refused unread
    f, tmp = ctx.storage.blobs.new_temp()
    h256, h1, total = hashlib.sha256(), git_blob_sha1(size), 0
    try:
        async for chunk in ctx.request.stream():
            total += len(chunk)
            if total > size:
                break  # more than announced: refused below, the rest is discarded unread
            f.write(chunk)
            h256.update(chunk)
            h1.update(chunk)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    if total != size or h256.hexdigest() != oid:
        f.close()
        tmp.unlink(missing_ok=True)
        raise bad_request(
            f"Uploaded content ({total} bytes) does not match the announced object ({size} bytes, sha256 {oid}).",
            "LfsObjectMismatch",
        )
    info = BlobInfo(oid, h1.hexdigest(), size)
    await ctx.run(ctx.storage.blobs.commit_temp, f, tmp, info)
    await ctx.run(ctx.storage.register_lfs, key, info)
    return json_response({})


async def verify_dataset(ctx: Ctx) -> Response:
    """Verify endpoint of a dataset repo."""
    ctx.params["type"] = "dataset"
    return await verify(ctx)


async def verify(ctx: Ctx) -> Response:
    """`POST /{id}.git/info/lfs/objects/verify` (authenticated): the object arrived complete."""
    ctx.params.setdefault("type", "model")
    key, _ = ctx.open_repo(write=True)
    body = await ctx.json_body()
    oid, size = _object(body, ctx.hub.config.max_upload_bytes)
    obj = await ctx.run(ctx.storage.lfs_object, key, oid)
    if obj is None or obj["size"] != size:
        raise HubError(
            404, "LfsObjectMissing", f"LFS object {oid} ({size} bytes) was not uploaded to {key.id}."
        )
    return json_response({})
