"""`POST /v1/predict` bodies: reading JSON (base64 images) or multipart (file parts), and the answers.

JSON: `{"images": [{"domain": "mnist", "data": "<base64>"}, ...], "top_k": 5, "return_logits": false}`.
Multipart: one `image` file part per image and a `domain` field per image in the same order (or one
`domain` for all), plus optional `top_k` and `return_logits` fields. An image without a domain (JSON:
absent, null or "auto"; multipart: no `domain` field at all, or an empty one or "auto") gets the domain
`AUTO`: the server routes it (serve_route.py).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .serve_errors import ServeError
from .serve_schema import AUTO, MAX_TOP_K, PredictRequest

IMAGE_PART_TYPES = ("image/", "application/octet-stream")
MULTIPART_FIELDS = ("image", "domain", "top_k", "return_logits")
BOOLEANS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


@dataclass
class Parsed:
    """A predict request read: each image's bytes and domain, and the answer options."""

    images: list[bytes]
    domains: list[str]
    top_k: int = 5
    return_logits: bool = False


def request_kind(request: Request) -> str:
    """`json` or `multipart`, or 415 naming the two content types this endpoint takes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return "json"
    if content_type == "multipart/form-data":
        return "multipart"
    raise ServeError(
        415,
        "unsupported_media_type",
        f"content type {content_type or 'none'!r} is not supported: send application/json with base64 "
        "images, or multipart/form-data with image file parts",
    )


def parse_json(body: bytes) -> Parsed:
    """A JSON predict body (runs in the worker pool: base64 decoding of large bodies takes time)."""
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        details = [
            {"loc": [str(p) for p in x["loc"]], "msg": x["msg"], "type": x["type"]} for x in e.errors()
        ]
        raise ServeError(
            422,
            "invalid_request",
            f"invalid JSON request: {where}: {first['msg']}; see the schema at /docs",
            details=details,
        ) from e
    images = [_b64(image.data, f"image {i}") for i, image in enumerate(request.images)]
    domains = [AUTO if image.domain is None else image.domain for image in request.images]
    return Parsed(images, domains, request.top_k, request.return_logits)


def _b64(data: str, what: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ServeError(
            400,
            "invalid_base64",
            f"{what}: data is not valid base64 ({e}); send standard base64 ('+' and '/') without line "
            "breaks (base64 -w0 FILE, Python's base64.b64encode) or a data: URL",
        ) from e


async def parse_multipart(request: Request, max_images: int, max_part_bytes: int) -> Parsed:
    """A multipart predict body: `image` file parts with `domain` fields in the same order."""
    try:
        form = await request.form(
            max_files=max_images, max_fields=max_images + 8, max_part_size=max_part_bytes
        )
    except HTTPException as e:  # starlette's multipart limits and parse errors, as a bare 400
        raise _multipart_error(str(e.detail), max_images) from e
    unknown = sorted({key for key in form.keys() if key not in MULTIPART_FIELDS})
    if unknown:  # a misspelt `domain` would otherwise send every image to routing
        raise ServeError(
            422,
            "invalid_request",
            f"unknown multipart field(s) {', '.join(map(repr, unknown))}; the fields are "
            f"{', '.join(MULTIPART_FIELDS)} (see the schema at /docs)",
        )
    files = form.getlist("image")
    domains = [d or AUTO for d in form.getlist("domain") if isinstance(d, str)]
    if not files:
        raise ServeError(422, "no_images", "no 'image' file parts: send each image as a part named 'image'")
    images = []
    for i, part in enumerate(files):
        if not isinstance(part, UploadFile):
            raise ServeError(422, "invalid_request", f"part 'image' #{i} is a text field; send a file")
        content_type = (part.content_type or "application/octet-stream").lower()
        if not content_type.startswith(IMAGE_PART_TYPES):
            raise ServeError(
                415,
                "unsupported_media_type",
                f"image {i} has content type {content_type!r}; send image/* (or application/octet-stream) parts",
            )
        images.append(await part.read())
    if len(domains) <= 1:  # one for all; none: route every image
        domains = (domains or [AUTO]) * len(images)
    if len(domains) != len(images):
        raise ServeError(
            422,
            "invalid_request",
            f"{len(images)} images and {len(domains)} 'domain' fields: give one domain per image, "
            "in the same order, or one for all",
        )
    top_k = _int_field(form.get("top_k"), "top_k", 5)
    return_logits = _bool_field(form.get("return_logits"), "return_logits")
    return Parsed(images, domains, top_k, return_logits)


def _multipart_error(detail: str, max_images: int) -> ServeError:
    if detail.startswith(("Too many files", "Too many fields")):
        return ServeError(
            413,
            "too_many_images",
            f"{detail.split('.')[0].lower()} in one request; this server takes at most {max_images} images "
            "(and a domain field for each): split them over several requests",
        )
    return ServeError(
        422,
        "invalid_request",
        f"the multipart body cannot be read ({detail.rstrip('.')}): send multipart/form-data with its "
        "boundary, as curl -F or httpx's files= do, or JSON with base64 images",
    )


def _bool_field(value: object, name: str) -> bool:
    if value is None:
        return False
    flag = BOOLEANS.get(value.strip().lower()) if isinstance(value, str) else None
    if flag is None:
        raise ServeError(422, "invalid_request", f"{name}={value!r} must be true or false (or 1 or 0)")
    return flag


def _int_field(value: object, name: str, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip().isdigit() or not 1 <= int(value) <= MAX_TOP_K:
        raise ServeError(422, "invalid_request", f"{name}={value!r} must be an integer in [1, {MAX_TOP_K}]")
    return int(value)


def prediction(
    domain: str, logits: torch.Tensor, labels: list[str] | None, top_k: int, return_logits: bool
) -> dict:
    """One image's answer from its logits row (the domain's classes only)."""
    probs = torch.softmax(logits, dim=0)
    scores, indices = probs.topk(min(top_k, logits.shape[0]))
    ranked = [
        {"label": labels[i] if labels else str(i), "index": i, "score": s}
        for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
    ]
    out = {"domain": domain, **ranked[0], "top_k": ranked}
    if return_logits:
        out["logits"] = logits.tolist()
    return out
