"""Request and response bodies of the inference service (pydantic; they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_K = 1000
AUTO = "auto"  # the domain of an image the server routes (docs/serve.md, "Requests without a domain")


class ImageIn(BaseModel):
    """One image of a JSON predict request."""

    model_config = ConfigDict(extra="forbid")
    domain: str | None = Field(
        None,
        description="the domain (loaded family member) that classifies this image; absent, null or "
        "'auto': the server routes it by the domains' signatures",
    )
    data: str = Field(description="the image file (PNG, JPEG, WebP, BMP, GIF, TIFF), base64-encoded")


class PredictRequest(BaseModel):
    """`POST /v1/predict` as JSON; multipart takes the same fields as form parts."""

    model_config = ConfigDict(extra="forbid")
    images: list[ImageIn] = Field(min_length=1, description="the images, each with its own domain")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="classes listed per image (capped at its classes)")
    return_logits: bool = Field(False, description="also return each image's raw logits")


class Ranked(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class ImageErrorOut(BaseModel):
    code: str
    message: str


class Prediction(BaseModel):
    """One image's answer. An image the server routed (no domain in the request) also has `routed`,
    `unknown`, `confidence` and `margin`; when it fits no loaded domain, `domain` is null, `nearest` names
    the best-scoring domain, and there is no class. A routed image whose domain was removed before its
    forward has `error` instead (the request's other images are answered)."""

    domain: str | None = Field(description="the domain that classified the image; null: unknown image")
    label: str | None = Field(
        None, description="the top class's name (the domain's own labels; its index if it has none)"
    )
    index: int | None = None
    score: float | None = Field(None, description="softmax probability of the top class")
    top_k: list[Ranked] | None = None
    logits: list[float] | None = None
    routed: bool | None = Field(None, description="true when the server chose the domain")
    unknown: bool | None = Field(None, description="true when the image fits no loaded domain")
    confidence: float | None = Field(
        None,
        description="how typical the image is of the chosen (or nearest) domain: the share of the domain's "
        "own held-out images whose signature score is at or below the image's (about 0.5 typical, under "
        "0.01 stranger than 99 % of them); null for a signature fitted before its score quantiles",
    )
    margin: float | None = Field(
        None,
        description="the best domain's signature score minus the second best (per feature; near 0: two "
        "domains fit about equally); null with one domain",
    )
    nearest: str | None = Field(None, description="the best-scoring domain of an unknown image")
    error: ImageErrorOut | None = Field(
        None, description="why this routed image got no answer (`domains_changed`: send it again)"
    )


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class DomainOut(BaseModel):
    name: str
    num_classes: int
    labels: list[str] | None
    metrics: dict[str, Any]
    data_config: dict[str, Any] | None
    source: str | None = Field(description="the family folder or repo it was loaded from")
    revision: str | None = Field(description="the commit (Hub) or revision it was loaded from")
    parameters: int = Field(description="parameters the domain adds to the backbone")
    bytes: int = Field(description="bytes of the domain's tensors")
    routable: bool = Field(
        description="it has a routing signature: images sent without a domain can reach it"
    )


class DomainsResponse(BaseModel):
    domains: list[DomainOut]


class HotAddRequest(BaseModel):
    """`POST /v1/domains`: load one domain of a family into the running model."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="a family folder on the server, or a Hub/registry repo id")
    domain: str = Field(description="the domain to load from that family")
    revision: str | None = Field(None, description="branch, tag or commit (Hub sources)")
    as_name: str | None = Field(None, description="serve it under this name instead")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all of the `ErrorResponse` shape."""
    return {status: {"model": ErrorResponse} for status in statuses}
