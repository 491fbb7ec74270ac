"""Images for the inference service: bytes -> checked PIL image -> each domain's eval tensor.

Decoding refuses what is not an image (of the formats below), what is truncated or corrupt, and images
over a pixel limit, which is checked from the header before any pixel is decoded (decompression
bombs). Each domain's preprocessing is its recorded data config (`DomainInfo.data_config`, resolved
against the backbone's timm config), built once per domain and config.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

from .serve_errors import ServeError
from .transforms import Preprocess, resolve_data_config

if TYPE_CHECKING:
    from .model import AdapterModel

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000  # a 6,300 x 6,300 photo; a decoded RGB image of this size is 120 MB
# the codes of the errors below, each about one image (the other images of its request are answerable)
IMAGE_ERRORS = frozenset(
    {
        "empty_image",
        "invalid_image",
        "truncated_image",
        "corrupt_image",
        "image_too_large",
        "unsupported_image",
    }
)


def decode_image(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A fully decoded PIL image, or a `ServeError` saying what is wrong with `data`.

    Example:
        >>> decode_image(png_bytes, "image 0").size
        (64, 64)
    """
    if not data:
        raise ServeError(400, "empty_image", f"{what} is empty: send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise _too_large(what, f"{image.width} x {image.height}", max_pixels)
            image.load()
    except Image.DecompressionBombError as e:  # over PIL's own limit, checked in Image.open
        size = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        if size is None:
            raise _too_large(what, "over PIL's own limit", max_pixels) from e
        if int(size[1]) <= max_pixels:  # a max_pixels above PIL's limit, which it does not raise
            raise _too_large(what, f"{size[1]} pixels, over PIL's own limit", int(size[2])) from e
        raise _too_large(what, f"{size[1]} pixels", max_pixels) from e
    except UnidentifiedImageError as e:
        raise ServeError(
            400,
            "invalid_image",
            f"{what} is not an image adapterkit reads; send {', '.join(FORMATS)} files",
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        code = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
        raise ServeError(
            400, code, f"{what} is truncated or corrupt ({e}); send the complete image file"
        ) from e
    return image


def _too_large(what: str, size: str, max_pixels: int) -> ServeError:
    return ServeError(
        413,
        "image_too_large",
        f"{what} is too large ({size}); images are decoded up to {max_pixels} pixels (--max-pixels): "
        "resize it",
        max_pixels=max_pixels,
    )


class Preprocessors:
    """Each domain's eval preprocessing (`Preprocess`), built once per domain and data config."""

    def __init__(self, model: AdapterModel) -> None:
        self._model = model
        self._cache: dict[tuple[str, str], Preprocess] = {}
        self._lock = threading.Lock()

    def get(self, domain: str) -> Preprocess:
        """The domain's preprocessing; KeyError if the domain is not loaded."""
        info = self._model.domain_info(domain)
        key = (domain, json.dumps(info.data_config, sort_keys=True, default=str))
        preprocess = self._cache.get(key)
        if preprocess is None:
            config = resolve_data_config(self._model.pretrained_cfg, info.data_config)
            preprocess = Preprocess(config)
            with self._lock:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != domain}
                self._cache[key] = preprocess
        return preprocess

    def forget(self, domain: str) -> None:
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != domain}

    def tensor(self, data: bytes, domain: str, what: str, max_pixels: int) -> torch.Tensor:
        """Decode `data` and preprocess it for `domain` (runs in the service's worker pool)."""
        image = decode_image(data, what, max_pixels)
        try:
            preprocess = self.get(domain)
        except KeyError as e:
            raise ServeError(404, "unknown_domain", f"domain {domain!r} was unloaded meanwhile") from e
        try:
            return preprocess(image)
        except ValueError as e:  # a mode the backbone cannot take
            raise ServeError(422, "unsupported_image", f"{what}: {e}") from e
