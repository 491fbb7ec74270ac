"""Preprocessing: timm's data config, the eval transform and the paper's training augmentation.

Eval: resize and centre crop as timm's eval transform does for the config's `crop_mode` (`center`: the
shorter side to `size / crop_pct`; `squash`: both sides; `border`: the longer side, padding with the
mean colour), pixel for pixel; then normalise with the config's mean and std. Train: resize to the input size, then a random crop (zero
padding around the image, CIFAR style, or a random-resized crop of a range of the image's area) and an
optional horizontal flip. Randomness comes from a numpy generator passed per call (see `data.py`).
Grey images become RGB (three equal channels) when the backbone takes 3 channels, unless refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

GRAYSCALE_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F")
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
MAX_INPUT_SIZE = 2048  # px per side of a domain's input and of its resize (timm's largest inputs: 1024)
CROP_MODES = ("center", "squash", "border")
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resolve_data_config(
    pretrained_cfg: dict[str, Any], overrides: dict[str, Any] | None = None, what: str = "data config"
) -> dict[str, Any]:
    """timm's data config for a backbone (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`,
    `crop_mode`) with per-domain overrides; lists instead of tuples, so it survives JSON unchanged.

    Example:
        >>> resolve_data_config(model.pretrained_cfg, {"input_size": 32})["input_size"]
        [3, 32, 32]
    """
    from timm.data import resolve_data_config as timm_resolve

    config = dict(timm_resolve(pretrained_cfg=dict(pretrained_cfg or {})))
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; use {list(DATA_CONFIG_KEYS)}")
    size = overrides.pop("input_size", None)
    if isinstance(size, int):
        size = (config["input_size"][0], size, size)
    if size is not None:
        config["input_size"] = tuple(size)
    config.update(overrides)
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in DATA_CONFIG_KEYS}
    check_data_config(out, what)
    return out


def check_data_config(config: dict[str, Any], what: str = "data config") -> None:
    """That a data config is one preprocessing can run within bounds (a family's files are input too: an
    `input_size` of 30,000 or a `crop_pct` of 0.01 would make every request allocate gigabytes).

    Raises:
        ValueError: naming the bad field and what it may hold.
    """
    size, mean, std = config.get("input_size"), config.get("mean"), config.get("std")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_int(v) for v in size)):
        raise ValueError(f"{what}: input_size={size!r}; use (C, H, W) integers")
    if not (1 <= size[0] <= 4 and all(1 <= v <= MAX_INPUT_SIZE for v in size[1:])):
        raise ValueError(f"{what}: input_size={list(size)}: C is 1-4 channels, H and W 1-{MAX_INPUT_SIZE} px")
    for name, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, (list, tuple)) and len(values) == size[0]):
            raise ValueError(f"{what}: {name}={values!r}: give one number per channel ({size[0]})")
        if not all(_number(v) and math.isfinite(v) and (name == "mean" or v > 0) for v in values):
            raise ValueError(
                f"{what}: {name}={list(values)} must be finite numbers" + (name == "std") * " > 0"
            )
    if config.get("interpolation") not in RESAMPLE:
        raise ValueError(
            f"{what}: interpolation={config.get('interpolation')!r}; use one of {sorted(RESAMPLE)}"
        )
    crop_pct = config.get("crop_pct", 1.0)  # timm's configs: 0.8-1.15
    if not (_number(crop_pct) and 0 < crop_pct <= 2 and max(size[1:]) / crop_pct <= MAX_INPUT_SIZE):
        raise ValueError(
            f"{what}: crop_pct={crop_pct!r}; use a number in (0, 2] with the resize before the crop, "
            f"{max(size[1:])} / crop_pct px, at most {MAX_INPUT_SIZE} px"
        )
    if config.get("crop_mode", "center") not in CROP_MODES:
        raise ValueError(f"{what}: crop_mode={config.get('crop_mode')!r}; use one of {list(CROP_MODES)}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ImageFormatError(ValueError):
    """An image in a form adapterkit does not read (layout, value range): every such image fails alike."""


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image, an (H, W[, C]) array or a (C, H, W) tensor (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            raise ImageFormatError(
                f"a tensor of shape {tuple(t.shape)} is (H, W, C): image tensors are (C, H, W); "
                "pass image.permute(2, 0, 1)"
            )
        if t.dim() not in (2, 3):
            raise ImageFormatError(
                f"a tensor of shape {tuple(t.shape)} is not one image: pass (C, H, W) tensors, one per item"
            )
        image = (t.permute(1, 2, 0) if t.dim() == 3 else t).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 3, 4):
            raise ImageFormatError(
                f"an array of shape {image.shape} is (C, H, W): image arrays are (H, W, C); "
                "pass image.transpose(1, 2, 0)"
            )
        if image.dtype != np.uint8:
            image = _unit_range(image.astype(np.float32))
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image)
    raise TypeError(f"cannot read an image of type {type(image).__name__}; use PIL images, arrays or tensors")


def check_batch(x: Any, in_chans: int | None) -> None:
    """That `x` is what a model's forward takes: a float (N, C, H, W) batch of `in_chans` channels;
    otherwise a ValueError that says how to get there."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected an image batch tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() == 3 and (in_chans is None or x.shape[0] == in_chans):
        raise ValueError(f"got one image {tuple(x.shape)}, not a batch: pass x.unsqueeze(0)")
    if x.dim() < 2:
        raise ValueError(f"expected an image batch tensor (N, C, H, W), got shape {tuple(x.shape)}")
    if in_chans is not None and x.shape[1] != in_chans:
        if x.dim() == 4 and x.shape[-1] == in_chans:
            raise ValueError(f"got a (N, H, W, C) batch {tuple(x.shape)}: pass x.permute(0, 3, 1, 2)")
        raise ValueError(
            f"the backbone expects {in_chans} input channels, got {x.shape[1]}: convert images "
            f"(for example PIL's image.convert('RGB') or x.expand(-1, {in_chans}, -1, -1))"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"got {x.dtype} images: the model takes float images normalised as the domain's data config "
            "says (adapterkit.transforms.Preprocess does it; by hand, x.float() / 255, then its mean and std)"
        )


def _unit_range(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as uint8; values outside (normalised or 0..255 images) are refused."""
    if image.size and not np.isfinite(image).all():
        raise ImageFormatError("the image holds NaN or infinite values")
    lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageFormatError(
            f"float pixel values in [{lo:.3g}, {hi:.3g}], not 0..1: pass raw images (PIL, uint8, or floats "
            "in 0..1); adapterkit normalises them with the domain's data config, so drop Normalize(...) "
            "from your transform, and divide 0..255 floats by 255"
        )
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised (C, H, W) tensor; with `train=True` also the random crop and flip.

    Args:
        data_config: from `resolve_data_config`.
        train: apply augmentation (needs a numpy generator per call).
        flip: random horizontal flip (off for glyphs, signs, digits).
        crop_padding: pixels of zero padding around the image before a random crop of the input size
            (CIFAR style; None: an eighth of the input size, 0: no crop).
        crop_scale: instead of padding, a random-resized crop covering this range of the image's area.
        grayscale: `convert` grey images to RGB when the backbone takes 3 channels, or `error`.
    """

    data_config: dict[str, Any]
    train: bool = False
    flip: bool = True
    crop_padding: int | None = None
    crop_scale: tuple[float, float] | None = None
    grayscale: str = "convert"

    def mode(self, image: Image.Image, what: str = "an image") -> Image.Image:
        """The image in the backbone's mode (RGB or L), or a ValueError saying how to fix it."""
        channels = self.data_config["input_size"][0]
        if image.mode.startswith("I;16"):
            image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
        if channels == 1:
            if image.mode not in GRAYSCALE_MODES:
                raise ValueError(
                    f"{what} is {image.mode}, but the backbone takes 1 channel: convert the images to grey "
                    "(image.convert('L'))"
                )
            return image.convert("L")
        if channels != 3:
            raise ValueError(
                f"the backbone takes {channels} input channels; adapterkit reads RGB or grey images"
            )
        if image.mode in GRAYSCALE_MODES and self.grayscale == "error":
            raise ValueError(
                f"{what} is grey ({image.mode}) but the backbone expects RGB: convert the images "
                "(image.convert('RGB')) or set TrainConfig(grayscale='convert')"
            )
        return image if image.mode == "RGB" else image.convert("RGB")

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> torch.Tensor:
        cfg = self.data_config
        _, h, w = cfg["input_size"]
        resample = RESAMPLE[cfg["interpolation"]]
        image = self.mode(to_pil(image))
        if self.train and self.crop_scale is not None:
            image = _random_resized_crop(image, (h, w), self.crop_scale, rng, resample)
        else:
            crop_pct = 1.0 if self.train else cfg["crop_pct"]
            mode, fill = cfg.get("crop_mode", "center"), tuple(round(255 * v) for v in cfg["mean"])
            image = _resize_crop(image, (h, w), crop_pct, mode, resample, fill[0] if len(fill) == 1 else fill)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).reshape(h, w, -1).permute(2, 0, 1)
        x = x.float().div_(255.0)
        if self.train:
            if rng is None:
                raise ValueError("training preprocessing needs a random generator")
            pad = max(h, w) // 8 if self.crop_padding is None else self.crop_padding
            if pad > 0 and self.crop_scale is None:
                x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
                top, left = rng.integers(0, 2 * pad + 1, size=2)
                x = x[:, top : top + h, left : left + w]
            if self.flip and rng.random() < 0.5:
                x = x.flip(-1)
        mean = torch.tensor(cfg["mean"]).view(-1, 1, 1)
        std = torch.tensor(cfg["std"]).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()


def _resize_crop(
    image: Image.Image,
    size: tuple[int, int],
    crop_pct: float,
    mode: str,
    resample: int,
    fill: tuple[int, ...] | int = 0,
) -> Image.Image:
    """timm's eval transform (`transforms_imagenet_eval`) for `crop_mode`, pixel for pixel:

    - `center`: the shorter side to size / crop_pct (aspect kept), a centre crop of `size`;
    - `squash`: both sides to size / crop_pct (aspect not kept), a centre crop;
    - `border`: the longer side to size / crop_pct (aspect kept), then a centre crop that pads what
      is missing with `fill` (timm: the mean colour), so no part of the image is lost at crop_pct 1.
    """
    h, w = size
    sh, sw = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if mode == "squash":
        new = (sw, sh)
    elif mode == "center" and sh == sw:  # torchvision's Resize(int): the longer side truncated
        short, long = sorted((image.width, image.height))
        new_long = int(sh * long / short)
        new = (sh, new_long) if image.width <= image.height else (new_long, sh)
    else:  # timm's ResizeKeepRatio (longest=1 for border): rounded
        ratios = (image.height / sh, image.width / sw)
        ratio = max(ratios) if mode == "border" else min(ratios)
        new = (round(image.width / ratio), round(image.height / ratio))
    if mode == "center" and new[0] * new[1] > 4 * sw * sh and new[0] >= w and new[1] >= h:
        return _resized_centre(image, new, (w, h), resample)  # a thin image (8000 x 1 px) would grow to
    if new != image.size:  # gigabytes: resample only the part the crop keeps
        image = image.resize(new, resample)
    return _centre_crop_or_pad(image, (w, h), fill)


def _centre_crop_or_pad(
    image: Image.Image, size: tuple[int, int], fill: tuple[int, ...] | int
) -> Image.Image:
    """torchvision's `CenterCrop` / timm's `center_crop_or_pad`: pad a side shorter than `size` (w, h)
    evenly (the extra pixel right/bottom) with `fill`, then crop at the rounded centre offset."""
    (w, h), (iw, ih) = size, image.size
    if w > iw or h > ih:
        padded = Image.new(image.mode, (max(w, iw), max(h, ih)), fill)
        padded.paste(image, ((w - iw) // 2 if w > iw else 0, (h - ih) // 2 if h > ih else 0))
        image, (iw, ih) = padded, padded.size
    left, top = int(round((iw - w) / 2.0)), int(round((ih - h) / 2.0))
    return image if (iw, ih) == (w, h) else image.crop((left, top, left + w, top + h))


def _resized_centre(image: Image.Image, new: tuple[int, int], size: tuple[int, int], resample: int):
    """The centre crop `size` (w, h) of `image` resized to `new`, resampling only the crop's region (PIL's
    `box`): the same pixels, without the whole resized image."""
    (w, h), sx, sy = size, new[0] / image.width, new[1] / image.height
    left, top = int(round((new[0] - w) / 2.0)), int(round((new[1] - h) / 2.0))
    return image.resize((w, h), resample, box=(left / sx, top / sy, (left + w) / sx, (top + h) / sy))


def _random_resized_crop(
    image: Image.Image, size: tuple[int, int], scale: tuple[float, float], rng: Any, resample: int
) -> Image.Image:
    area = image.width * image.height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= image.width and 0 < ch <= image.height:
            left, top = (
                int(rng.integers(0, image.width - cw + 1)),
                int(rng.integers(0, image.height - ch + 1)),
            )
            return image.resize((size[1], size[0]), resample, box=(left, top, left + cw, top + ch))
    return _resize_crop(image, size, 1.0, "center", resample)
