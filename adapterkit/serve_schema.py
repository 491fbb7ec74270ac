"""Request and response bodies of the inference service (pydantic; they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_K = 1000


class ImageIn(BaseModel):
    """One image of a JSON predict request."""

    model_config = ConfigDict(extra="forbid")
    domain: str = Field(description="the domain (loaded family member) that classifies this image")
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


class Prediction(BaseModel):
    domain: str
    label: str = Field(description="the top class's name (the domain's own labels; its index if it has none)")
    index: int
    score: float
    top_k: list[Ranked]
    logits: list[float] | None = None


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
