"""Xet storage over HTTP: the token endpoints and the CAS API that `hf_xet` speaks (Xet protocol 1.1).

Upload: preupload answers `lfs` for a large file; the client asks `xet-write-token/{rev}` (Hub token)
for a CAS token, POSTs each new xorb to `/v1/xorbs/default/{hash}` and the shard describing its files
to `/v1/shards`, then commits `lfsFile` lines by SHA-256 as for classic LFS. Every xorb and shard is
verified before it is acknowledged (`XetStore`). A registered file is also written, verified against
its SHA-256, into the plain blob store and recorded as an LFS object of the token's repo (with its Xet
hash), so the commit path, `/resolve` for clients without Xet, fsck and gc work unchanged.

Download: `/resolve` advertises `X-Xet-Hash` and a `Link: <xet-read-token/{commit}>; rel="xet-auth"`;
the client asks `/v1/reconstructions/{file}` and GETs byte ranges of xorbs from signed, expiring URLs.

CAS tokens are HMAC-signed (the registry key), expire after `signed_url_ttl_s` and name the user,
the Hub token, the repo and the scope; every CAS request re-checks that the Hub token still exists
and still has that access to the repo, exactly as the rest of the API does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse

from .api_read import parse_range, read_range
from .blobs import BlobInfo, BlobStore, git_blob_sha1
from .context import MB, Ctx, Hub, json_response
from .errors import HubError, repo_not_found, revision_not_found, too_large
from .routing import Router
from .storage import RepoKey
from .validation import check_ref_name, is_hex
from .xet_store import XetError, XetFile

REPO = "/api/{types}/{ns}/{name}"
XORB_LIMIT = 96 * MB
"""Largest xorb body accepted (the protocol caps a xorb at 64 MiB of chunk data)."""
SHARD_LIMIT = 64 * MB
"""Largest shard body accepted."""
TOKEN_PREFIX = "xet_"
_TRUE = ("1", "true", "True")
_XET_STATUS = {"FileNotFound": 404, "RangeNotSatisfiable": 416}

Handler = Callable[[Ctx], Awaitable[Response]]


def _cas(handler: Handler) -> Handler:
    """Mark a CAS route: the app skips the Hub-token check, the handler checks its CAS token."""
    handler.cas_auth = True  # type: ignore[attr-defined]
    return handler


def register(router: Router) -> None:
    """Add the Xet routes."""
    router.add("GET POST", REPO + "/xet-read-token/{*rev}", read_token)
    router.add("GET POST", REPO + "/xet-write-token/{*rev}", write_token)
    router.add("POST", "/v1/xorbs/{prefix}/{hash}", upload_xorb)
    router.add("GET", "/v1/xorbs/{prefix}/{hash}", get_xorb)
    router.add("POST", "/v1/shards", upload_shard)
    router.add("GET", "/v1/reconstructions/{hash}", reconstruction)
    router.add("GET", "/v2/reconstructions/{hash}", reconstruction)
    router.add("GET", "/v1/chunks/{prefix}/{hash}", dedupe_query)
    for pattern in ("/v1/xorb-grants/{*rest}", "/v1/xorb-commits/{*rest}", "/v2/shards", "/v1/telemetry"):
        router.add("POST", pattern, not_offered)


@_cas
async def not_offered(ctx: Ctx) -> Response:
    """Optional CAS routes (upload grants, v2 shard stream, telemetry): 404, so hf_xet uses the v1 routes."""
    raise HubError(404, "NotFound", "Not offered by this registry; use the v1 xorb and shard upload routes.")


# ----------------------------------------------------------------------------- tokens


async def read_token(ctx: Ctx) -> Response:
    """`GET .../xet-read-token/{rev}`: a read CAS token for anyone who may read the repo."""
    return await _token(ctx, "read")


async def write_token(ctx: Ctx) -> Response:
    """`GET .../xet-write-token/{rev}`: a write CAS token for a writer of the repo, on an existing branch."""
    return await _token(ctx, "write")


async def _token(ctx: Ctx, scope: str) -> Response:
    if ctx.params["types"] == "spaces":  # the registry holds no Spaces: the answer of a missing repo
        raise repo_not_found(f"{ctx.params['ns']}/{ctx.params['name']}")
    key, _ = ctx.open_repo(write=scope == "write")
    rev = ctx.params["rev"] or "main"
    if scope == "write":
        if ctx.request.query_params.get("create_pr") in _TRUE:
            raise HubError(
                501, "PullRequestsNotSupported", "Pull requests are not supported; commit to a branch."
            )
        await ctx.run(_check_branch, ctx, key, rev)
    else:
        await ctx.run(ctx.storage.resolve, key, rev)
    token, exp = _issue(ctx, key, scope)
    cas = ctx.base_url()
    headers = {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)}
    return json_response({"casUrl": cas, "exp": exp, "accessToken": token}, headers=headers)


def _check_branch(ctx: Ctx, key: RepoKey, rev: str) -> None:
    check_ref_name(rev)
    name = rev.removeprefix("refs/heads/")
    if name not in ctx.storage.refs(key)["branches"]:
        raise revision_not_found(rev, "Uploads go to existing branches; create it first with create_branch.")


def _issue(ctx: Ctx, key: RepoKey, scope: str) -> tuple[str, int]:
    """A signed CAS token for `key` and `scope`, and its expiry (Unix seconds)."""
    exp = int(time.time()) + ctx.hub.config.signed_url_ttl_s
    p = ctx.principal
    claims = {"type": key.type, "repo": key.id, "scope": scope, "exp": exp}
    claims.update(user=p.user if p else "", tid=p.token_id if p else "")
    raw = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return f"{TOKEN_PREFIX}{payload}.{ctx.hub.signer.sign('xet-cas', payload)}", exp


def _claims(ctx: Ctx) -> dict[str, Any]:
    """The verified claims of the request's CAS token (401 if missing, forged or expired)."""
    scheme, _, token = ctx.request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    payload, _, sig = token.removeprefix(TOKEN_PREFIX).rpartition(".")
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or not payload:
        raise HubError(
            401,
            "XetTokenRequired",
            "The Xet CAS API needs `Authorization: Bearer <CAS token>`; get one from "
            "/api/models/{id}/xet-read-token/{rev} or xet-write-token/{rev} with your Hub token.",
        )
    try:
        if not ctx.hub.signer.verify(sig, "xet-cas", payload):
            raise ValueError
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = int(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise HubError(
            401, "InvalidXetToken", "This Xet CAS token was not issued by this registry; ask for a new one."
        ) from None
    if exp < time.time():
        raise HubError(401, "ExpiredXetToken", "This Xet CAS token has expired; ask for a new one.")
    return claims


def _cas_repo(ctx: Ctx, write: bool) -> RepoKey:
    """The repo of the request's CAS token, once its Hub token is checked again for this access."""
    claims = _claims(ctx)
    principal = None
    if claims["tid"]:
        principal = ctx.hub.tokens.by_id(claims["tid"])
        if principal is None or principal.user != claims["user"]:
            raise HubError(
                401,
                "InvalidXetToken",
                "The Hub token this Xet token was issued for was revoked; authenticate again.",
            )
    if write and claims["scope"] != "write":
        raise HubError(
            403,
            "Forbidden",
            "This Xet token has read scope: uploads need one from xet-write-token (a write token of the repo).",
        )
    ns, _, name = str(claims["repo"]).partition("/")
    ctx.principal = principal
    ctx.params.update(types=f"{claims['type']}s", ns=ns, name=name)
    key, _ = ctx.open_repo(write=write)
    return key


# ----------------------------------------------------------------------------- uploads


def _hash(value: str, what: str) -> str:
    if not is_hex(value, 64, 64):
        raise HubError(
            400, "InvalidHash", f"Invalid {what} hash {value!r}: expected 64 lowercase hex digits."
        )
    return value


def _prefix(ctx: Ctx, allowed: tuple[str, ...]) -> None:
    if ctx.params["prefix"] not in allowed:
        raise HubError(
            400, "InvalidPrefix", f"Unknown prefix {ctx.params['prefix']!r}: use {' or '.join(allowed)}."
        )


def xet_error(err: XetError) -> HubError:
    """The HTTP answer to a refused Xet object (400 unless the code says otherwise)."""
    return HubError(_XET_STATUS.get(err.code, 400), err.code, err.message)


@_cas
async def upload_xorb(ctx: Ctx) -> Response:
    """`POST /v1/xorbs/default/{hash}`: verify the xorb against its hash, then store it."""
    _prefix(ctx, ("default",))
    xorb_hash = _hash(ctx.params["hash"], "xorb")
    _cas_repo(ctx, write=True)
    body = await ctx.read_body(XORB_LIMIT)
    ctx.hub.count_received("xorb", len(body))
    try:
        new = await ctx.run(ctx.hub.xet.put_xorb, xorb_hash, body)
    except XetError as e:
        raise xet_error(e) from None
    return json_response({"was_inserted": new})


@_cas
async def upload_shard(ctx: Ctx) -> Response:
    """`POST /v1/shards`: verify the shard, register its files and make them committable in the repo."""
    key = _cas_repo(ctx, write=True)
    body = await ctx.read_body(SHARD_LIMIT)
    ctx.hub.count_received("shard", len(body))
    await ctx.run(register_shard, ctx.hub, key, body)
    return json_response({"result": 1})


def register_shard(hub: Hub, key: RepoKey, body: bytes) -> list[XetFile]:
    """Register a shard's files, write each one as a plain blob and record it as an LFS object of `key`.

    The store writes the bytes of each new file into a temporary blob while it computes their
    SHA-256 (`_BlobSpool`), so a file is reconstructed once; the blob is moved into the store only
    after the shard verified, and a temporary file left by a crash is removed at the next start.
    """
    files: list[XetFile] = []
    try:
        files = hub.xet.put_shard(body, sink=lambda size: _BlobSpool(hub.storage.blobs, size))
        for f in files:
            if f.size > hub.config.max_upload_bytes:
                raise too_large(f.size, hub.config.max_upload_bytes)
            hub.storage.register_lfs(key, materialise(hub, f), xet_hash=f.file_hash)
    except XetError as e:  # refused shard, or a stored xorb found corrupt while reading the file back
        raise xet_error(e) from None
    finally:
        for f in files:
            if isinstance(f.plain, _BlobSpool):
                f.plain.discard()  # a no-op for the ones committed
    return files


class _BlobSpool:
    """A temporary blob the Xet store writes a file's plain bytes into (see `XetStore.put_shard`)."""

    def __init__(self, blobs: BlobStore, size: int):
        self.blobs, self.size, self.n = blobs, size, 0
        self.out, self.tmp = blobs.new_temp()
        self.sha1 = git_blob_sha1(size)

    def write(self, piece: bytes) -> None:
        self.out.write(piece)
        self.sha1.update(piece)
        self.n += len(piece)

    def discard(self) -> None:
        """Close and remove the temporary file (nothing if it was committed)."""
        if not self.out.closed:
            self.out.close()
            self.tmp.unlink(missing_ok=True)

    def commit(self, f: XetFile) -> BlobInfo:
        """Move the bytes into the blob store as the blob of `f` (the store hashed exactly these bytes)."""
        if self.n != f.size:
            self.discard()
            raise _mismatch(f, self.n, None)
        return self.blobs.commit_temp(self.out, self.tmp, BlobInfo(f.sha256, self.sha1.hexdigest(), self.n))


def _mismatch(f: XetFile, n: int, sha: str | None) -> HubError:
    got = f"{n} bytes" + (f" with SHA-256 {sha}" if sha else "")
    return HubError(
        400,
        "Sha256Mismatch",
        f"Xet file {f.file_hash} reconstructs to {got}, not the {f.size} bytes and SHA-256 "
        f"{f.sha256} its shard announced; upload it again.",
    )


def materialise(hub: Hub, f: XetFile) -> BlobInfo:
    """The plain bytes of a Xet file in the blob store, checked against its size and SHA-256: moved in
    from the store's SHA-256 pass (`f.plain`), or reconstructed (a file registered before)."""
    blobs = hub.storage.blobs
    if blobs.exists(f.sha256, f.size):
        info = blobs.hash_file(f.sha256)
        if info.sha256 != f.sha256:
            raise HubError(
                500, "BlobCorrupted", f"Stored blob {f.sha256} is corrupted; run adapterkit-registry fsck."
            )
        blobs.touch(f.sha256)
        return info
    if isinstance(f.plain, _BlobSpool):
        return f.plain.commit(f)
    spool = _BlobSpool(blobs, f.size)
    h256 = hashlib.sha256()
    try:
        for piece in hub.xet.read_file(f.file_hash):
            spool.write(piece)
            h256.update(piece)
    except BaseException:
        spool.discard()
        raise
    if h256.hexdigest() != f.sha256:
        spool.discard()
        raise _mismatch(f, spool.n, h256.hexdigest())
    return spool.commit(f)


# ----------------------------------------------------------------------------- downloads


@_cas
async def reconstruction(ctx: Ctx) -> Response:
    """`GET /v1|v2/reconstructions/{file}` (optional `Range`): terms and signed xorb URLs to fetch
    (v2: one byte range per URL, so the client's `Range` header is always a single range)."""
    file_hash = _hash(ctx.params["hash"], "file")
    key = _cas_repo(ctx, write=False)
    f = await ctx.run(ctx.hub.xet.file, file_hash)
    if f is None or await ctx.run(ctx.storage.lfs_xet, key, f.sha256) != file_hash:
        raise HubError(
            404,
            "XetFileNotFound",
            f"Xet file {file_hash} is not part of {key.id}; check the repo and revision.",
        )
    header = ctx.request.headers.get("range")
    byte_range = parse_range(header, f.size) if header else None
    exp = int(time.time()) + ctx.hub.config.signed_url_ttl_s
    base, signer = ctx.base_url(), ctx.hub.signer

    def xorb_url(xorb_hash: str) -> str:
        sig = signer.sign("xorb", xorb_hash, str(exp))
        return f"{base}/v1/xorbs/default/{xorb_hash}?exp={exp}&sig={sig}"

    try:
        v2 = ctx.request.url.path.startswith("/v2/")
        answer = ctx.hub.xet.reconstruction_v2 if v2 else ctx.hub.xet.reconstruction
        body = await ctx.run(answer, file_hash, byte_range, xorb_url)
    except XetError as e:
        raise xet_error(e) from None
    return json_response(body)


@_cas
async def get_xorb(ctx: Ctx) -> Response:
    """`GET /v1/xorbs/default/{hash}?exp=&sig=` with `Range`: xorb bytes for a signed, unexpired URL."""
    _prefix(ctx, ("default",))
    xorb_hash = _hash(ctx.params["hash"], "xorb")
    q = ctx.request.query_params
    exp, sig = q.get("exp", ""), q.get("sig", "")
    if not exp.isdigit() or not ctx.hub.signer.verify(sig, "xorb", xorb_hash, exp):
        raise HubError(
            403, "InvalidSignature", "Invalid xorb URL signature; ask /v1/reconstructions for a new URL."
        )
    if int(exp) < time.time():
        raise HubError(403, "ExpiredSignature", "This xorb URL has expired; ask /v1/reconstructions again.")
    try:
        path = ctx.hub.xet.xorb_path(xorb_hash)
        size = path.stat().st_size
    except (XetError, FileNotFoundError):
        raise HubError(404, "XorbMissing", f"Xorb {xorb_hash} is not stored here.") from None
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    start, end, status = 0, size, 200
    if ctx.request.headers.get("range"):
        start, end = parse_range(ctx.request.headers["range"], size)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        status = 206
    headers["Content-Length"] = str(end - start)
    if ctx.request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(read_range(path, start, end), status_code=status, headers=headers)


@_cas
async def dedupe_query(ctx: Ctx) -> Response:
    """`GET /v1/chunks/default-merkledb/{chunk}` (`default` too, as hf_xet 1.8 sends): global dedupe.

    Answers a shard describing the xorb that holds the chunk, or 404. Only write tokens may ask (the
    spec's minimum is read; only uploads need it, and this keeps anonymous readers from probing).
    """
    _prefix(ctx, ("default-merkledb", "default"))
    chunk_hash = _hash(ctx.params["hash"], "chunk")
    _cas_repo(ctx, write=True)
    data = await ctx.run(ctx.hub.xet.dedupe_shard, chunk_hash)
    if data is None:
        raise HubError(404, "ChunkNotFound", f"Chunk {chunk_hash} is not indexed for global dedupe.")
    return Response(data, media_type="application/octet-stream")
