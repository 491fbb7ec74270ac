"""A domain's signature: what routing knows of a domain's images, fitted from them alone.

A signature is a mixture of K diagonal Gaussians (`COMPONENTS`) of the frozen backbone's style features on
the domain's images (per component a weight, a mean and a log-variance per feature: about 2 K F numbers,
stored as 8-bit codes) plus a calibrated threshold: the score below which only `REJECT` of the domain's own
images fall. Fitted with the domain's head energies on the same images, it also keeps an open-set
calibration (`open_scores`): where an image sits among the domain's own images by signature score and by
head energy. Each signature comes from its own domain's images alone and never changes afterwards, so
adding or removing a domain changes no other domain's signature, bit for bit (routing: `router.py`).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

SIGNATURE_SHARE = 0.01  # a signature's bytes at most, as a share of its domain's (fit_signature's budget)
# ... but never fewer components than this: 1 % of a small domain (a CIFAR ResNet-20's, 131 KB) bought one
# Gaussian, which routed the real sequence worse than six (docs/routing.md, "Signature")
MIN_COMPONENTS = 6
REJECT = 0.01  # share of a domain's own images the threshold may call unknown
MAX_IMAGES = 4096  # images a signature is fitted on (the rest add nothing measurable)
COMPONENTS = 6  # Gaussians per signature: what the 1 % budget buys the CIFAR ResNets in 8-bit codes; on the
# real sequence (64 px) 5 -> 6 components took mean routing from 0.977 to 0.981 (docs/benchmarks.md, "Routing")
EM_STEPS = 30
# Means and log-variances are stored as 8-bit codes, per feature an offset and a step in half precision
# (`mean_range`, `log_var_range`: 2 x F), half the bytes of half precision, so twice the components fit a
# budget. Where decoding would move any fitting image's score by more than `ROUNDING` (per feature; scores of
# different domains differ by about 1), they are stored in half precision instead, and where that still
# moves them (a mean far from zero in standard deviations, or beyond half precision's range), the means in
# float32, with fewer components if the budget says so.
CODES = torch.uint8
STORAGE = torch.float16
ROUNDING = 0.01
FORMS = (CODES, torch.float16, torch.float32)  # the means' storage, in order of preference
FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # floats a signature file may hold (older: float32)
FIXED_BYTES = 8  # a signature's bytes besides its components: threshold (float32) and maps (int32)
# Unknown images after the forward (`open_scores`): the best signature score plus, weighted by OPEN_WEIGHTS,
# the log of where the image sits among its routed domain's own images, by signature score and by the
# domain's head energy (logsumexp of its logits); below the domain's `open_threshold` it is unknown. Chosen
# on one half of the real sequence's test images at 64 px and checked on the other: AUROC >= 0.95 against
# every held-out domain and CIFAR-10, where the signature score alone reaches 0.87 (docs/benchmarks.md).
OPEN_WEIGHTS = (0.1, 0.2)  # (signature score, head energy)
OPEN_FLOOR = 1e-3  # log(p + OPEN_FLOOR): a value below every quantile counts as p = 0
# the probabilities whose quantiles a signature keeps (dense in the lower tail, where unknown images fall)
PROBS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
OPEN_BYTES = 4 * (2 * len(PROBS) + 1)  # score and energy quantiles and `open_threshold`, float32
OPEN_BUFFERS = ("score_quantiles", "energy_quantiles", "open_threshold")


def _bytes(form: torch.dtype, num_features: int) -> tuple[int, int]:
    """A signature's bytes stored in `form`: (per component, fixed)."""
    if form == CODES:
        return 2 * num_features + 4, FIXED_BYTES + 4 * num_features * STORAGE.itemsize
    return num_features * (form.itemsize + STORAGE.itemsize) + 4, FIXED_BYTES


def _encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of `t` (K x F) and, per feature, the offset and step that decode them (2 x F, half
    precision): the offset rounded down and the step up, so the codes span every component."""
    t = t.float()
    low, high = t.min(dim=0).values, t.max(dim=0).values
    offset = low.to(STORAGE)
    offset = torch.where(offset.float() > low, offset.nextafter(torch.full_like(offset, -math.inf)), offset)
    step = ((high - offset.float()) / 255).to(STORAGE)
    short = offset.float() + 255 * step.float() < high
    step = torch.where(short, step.nextafter(torch.full_like(step, math.inf)), step)
    codes = (t - offset.float()) / torch.where(step > 0, step.float(), torch.ones_like(low))
    return codes.round().clamp(0, 255).to(CODES), torch.stack([offset, step])


class DomainSignature(nn.Module):
    """One domain's feature statistics, a mixture of K diagonal Gaussians (`mean` and `log_var`: K x F,
    8-bit codes with their `*_range`, or half precision, `mean` in float32 where it has to; `log_weight`:
    K), its unknown-sample `threshold`, and (fitted with energies) its open-set calibration: quantiles
    at PROBS of its held-out scores and of its head's energies, and `open_threshold` (see `open_scores`).
    A signature loaded from a file keeps the file's storage (those written before codes stay half
    precision or float32, bit for bit)."""

    def __init__(self, num_features: int, components: int = 1, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(components, num_features, device=device))
        self.register_buffer("log_var", torch.zeros(components, num_features, device=device, dtype=STORAGE))
        self.register_buffer("log_weight", torch.full((components,), -math.log(components), device=device))
        self.register_buffer("threshold", torch.tensor(-math.inf, device=device))
        # feature maps the signature reads (`style_features`); 0: every stage's but the last (the default,
        # and what signatures written before this buffer read)
        self.register_buffer("maps", torch.tensor(0, device=device, dtype=torch.int32))
        self.register_buffer("mean_range", None)  # offset and step per feature, when `mean` holds codes
        self.register_buffer("log_var_range", None)
        for name in OPEN_BUFFERS:  # set by `fit(..., energies=)`; signatures written before them have none
            self.register_buffer(name, None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        state_dict.setdefault(prefix + "maps", torch.tensor(0, dtype=torch.int32))  # written before `maps`
        present = [isinstance(state_dict.get(prefix + name), torch.Tensor) for name in OPEN_BUFFERS]
        if any(present) and not all(present):
            raise RuntimeError(f"a signature's open-set calibration needs all of {OPEN_BUFFERS}, or none")
        shapes = ((len(PROBS),), (len(PROBS),), ())
        for name, shape, here in zip(OPEN_BUFFERS, shapes, present, strict=True):
            setattr(self, name, torch.empty(shape, device=self.threshold.device) if here else None)
        for name in ("mean", "log_var"):
            t, span = state_dict.get(prefix + name), state_dict.get(prefix + name + "_range")
            if not isinstance(t, torch.Tensor):
                continue  # strict loading names the missing key
            if t.dtype not in (CODES, *FLOATS):
                raise RuntimeError(f"signature.{name} is {t.dtype}; expected one of {(CODES, *FLOATS)}")
            coded = t.dtype == CODES
            if coded != isinstance(span, torch.Tensor) or (
                coded and (span.dtype not in FLOATS or tuple(span.shape) != (2, t.shape[-1]))
            ):
                raise RuntimeError(
                    f"signature.{name} ({t.dtype}) needs signature.{name}_range (2 x F floats) exactly when "
                    "it holds 8-bit codes"
                )
            setattr(self, name, getattr(self, name).to(t.dtype))
            setattr(self, name + "_range", torch.empty_like(span, device=t.device) if coded else None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _decoded(self, name: str) -> torch.Tensor:
        t, span = getattr(self, name), getattr(self, name + "_range")
        return t.float() if span is None else span[0].float() + t.float() * span[1].float()

    def _store(self, form: torch.dtype) -> DomainSignature:
        """Store the means (and, as 8-bit codes, the log-variances) in `form`; returns self."""
        if form == CODES:
            for name in ("mean", "log_var"):
                codes, span = _encode(getattr(self, name))
                setattr(self, name, codes)
                setattr(self, name + "_range", span)
        else:
            self.mean = self.mean.to(form)
        return self

    @property
    def num_features(self) -> int:
        return self.mean.shape[1]

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Mixture log-likelihood per feature (without the constant) of each row of `features`."""
        mean, log_var = self._decoded("mean"), self._decoded("log_var")
        z = (features.float()[:, None] - mean) ** 2 * torch.exp(-log_var)
        per_component = -0.5 * (z + log_var).sum(dim=2) + self.log_weight
        return per_component.logsumexp(dim=1) / self.num_features

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        features: torch.Tensor,
        components: int = COMPONENTS,
        reject: float = REJECT,
        max_bytes: int | None = None,
        energies: torch.Tensor | None = None,
        calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
        min_components: int = 1,
    ) -> DomainSignature:
        """The signature of `features` (N x F, N >= 4 per component), fitted by EM from a fixed seed
        (the same features always give the same signature). The threshold is calibrated out of sample:
        the `reject` quantile of the scores of every other row under a mixture fitted on the remaining
        rows (scores of the rows a model was fitted on are optimistic when F is close to N). With
        `max_bytes` (e.g. 1 % of the domain's adapter bytes) it uses as many components as fit in it, at
        least one. With `energies` (N: the domain's head energy, logsumexp of its logits, on the same
        images) it also keeps the open-set calibration that `open_scores` reads, from those images, or
        from `calibration` (features and energies of images the domain did not train on) when given: a
        head is surer of its own training images than of new ones, so a calibration on them calls more
        than `reject` of new images unknown. A `calibration` of fewer than 1 / `reject` images cannot place
        that quantile: then the training images calibrate, with a warning."""
        if features.dim() != 2 or features.shape[0] < 4:
            raise ValueError(
                f"a signature needs at least 4 feature rows (N x F), got shape {tuple(features.shape)}"
            )
        if energies is not None and tuple(energies.shape) != features.shape[:1]:
            raise ValueError(f"energies {tuple(energies.shape)} must have one value per feature row")
        components = max(1, min(components, features.shape[0] // 8))
        for form in FORMS:
            k = components
            if max_bytes is not None:
                per_component, fixed = _bytes(form, features.shape[1])
                fixed += OPEN_BYTES if energies is not None else 0
                k = max(1, min(components, max(min_components, (max_bytes - fixed) // per_component)))
            signature = cls._mixture(features, k)
            exact = signature.score(features)
            if (signature._store(form).score(features) - exact).abs().max() <= ROUNDING:
                break
        held_out = cls._mixture(features[0::2], k)._store(form).score(features[1::2])
        signature.threshold.copy_(torch.quantile(held_out, reject))
        if calibration is not None:
            if energies is None or calibration[0].shape[0] != calibration[1].shape[0]:
                raise ValueError("a calibration needs the fitting images' energies and one energy per row")
            if calibration[0].shape[0] < math.ceil(1 / reject):
                warnings.warn(
                    f"{calibration[0].shape[0]} calibration images are too few to place the {reject:g} "
                    f"quantile of the unknown decision (at least {math.ceil(1 / reject)}): it is calibrated "
                    "on the training images instead; pass more held-out images to calibrate on them",
                    stacklevel=user_level(),
                )
                calibration = None
        if calibration is not None:
            scores = signature.score(calibration[0])
            signature._calibrate_open(scores, calibration[1].float(), calibration[1].float(), reject)
        elif energies is not None:
            signature._calibrate_open(held_out, energies[1::2].float(), energies.float(), reject)
        return signature

    def _calibrate_open(
        self, scores: torch.Tensor, energies: torch.Tensor, pool: torch.Tensor, reject: float
    ) -> None:
        """Quantiles of the out-of-sample `scores` and of the energies `pool`, and the `reject` quantile of
        the open scores of those images (`scores` and `energies` row by row)."""
        probs = torch.tensor(PROBS, device=scores.device)
        self.score_quantiles = torch.quantile(scores.float(), probs)
        self.energy_quantiles = torch.quantile(pool, probs)
        own = open_scores(scores, energies, [self] * len(scores))
        self.open_threshold = torch.quantile(own, reject)

    @classmethod
    def _mixture(cls, features: torch.Tensor, components: int, steps: int = EM_STEPS) -> DomainSignature:
        f = features.double()
        # A floor keeps constant features (dead ReLUs) from making every other image infinitely unlikely.
        floor = 1e-3 * float(f.var(dim=0).mean()) + 1e-12
        start = torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(0))[:components]
        mean, var = f[start.to(f.device)], f.var(dim=0).expand(components, -1).clamp_min(floor)
        weight = torch.full((components,), 1.0 / components, dtype=f.dtype, device=f.device)
        for _ in range(steps if components > 1 else 0):
            log_p = -0.5 * ((f[:, None] - mean) ** 2 / var + var.log()).sum(dim=2) + weight.log()
            r = log_p.softmax(dim=1)  # responsibilities, N x K
            n = r.sum(dim=0).clamp_min(1e-9)
            weight, mean = n / n.sum(), (r.T @ f) / n[:, None]
            var = ((r.T @ f**2) / n[:, None] - mean**2).clamp_min(floor)
        if components == 1:
            mean, var = f.mean(dim=0, keepdim=True), f.var(dim=0, keepdim=True).clamp_min(floor)
        signature = cls(f.shape[1], components, device=features.device)
        signature.mean.copy_(mean)
        signature.log_var.copy_(var.log())  # rounded to STORAGE: the threshold is calibrated on rounded ones
        signature.log_weight.copy_(weight.log().float())
        return signature


def _cdf(quantiles: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The share of a domain's own images at or below each value, interpolated linearly between its
    quantiles at PROBS (0 below the lowest, 1 above the highest; NaN for NaN). The values may sit on
    another device than the signature (the service answers from logits on the CPU)."""
    q, probs = quantiles.to(values.device, torch.float32), torch.tensor(PROBS, device=values.device)
    above = torch.searchsorted(q, values.float().contiguous(), right=True)  # quantiles <= each value
    lo, hi = (above - 1).clamp(0, len(q) - 1), above.clamp(max=len(q) - 1)
    span = q[hi] - q[lo]
    t = torch.where(span > 0, (values - q[lo]) / torch.where(span > 0, span, 1), 0).clamp(0, 1)
    p = probs[lo] + t * (probs[hi] - probs[lo])
    p = torch.where(above == 0, 0.0, torch.where(above == len(q), 1.0, p))
    return torch.where(values.isnan(), math.nan, p)  # (searchsorted sorts NaN above every quantile)


def typicality(best: torch.Tensor, signatures: list[DomainSignature]) -> torch.Tensor:
    """Per sample, the share of its domain's (`signatures[i]`) own held-out images whose signature score
    is at or below its score `best[i]` (`_cdf` of the domain's `score_quantiles`): about 0.5 for a typical
    image of the domain, under 0.01 for one stranger than 99 % of them (what the threshold calls unknown),
    0 below the lowest quantile. NaN where the signature has no `score_quantiles` (fitted before they
    existed: refit it) or no domain scored the sample (`best` -inf is 0, NaN stays NaN)."""
    out = torch.full(best.shape, math.nan, dtype=torch.float32, device=best.device)
    for signature in dict.fromkeys(signatures):
        if signature.score_quantiles is None:
            continue
        rows = torch.tensor([s is signature for s in signatures], dtype=torch.bool, device=best.device)
        out[rows] = _cdf(signature.score_quantiles, best[rows].float())
    return out


def open_scores(
    best: torch.Tensor, energies: torch.Tensor, signatures: list[DomainSignature]
) -> torch.Tensor:
    """Per sample, the open score of its routed domain (`signatures[i]`, which needs the open-set
    calibration of `fit(..., energies=)`): its signature score `best` plus OPEN_WEIGHTS times the log of
    where the score and the head energy (`energies`: logsumexp of that domain's logits) sit among the
    domain's own images. Below the domain's `open_threshold`, or NaN (NaN logits): unknown."""
    a, b = OPEN_WEIGHTS
    out = torch.empty_like(best, dtype=torch.float32)
    for signature in dict.fromkeys(signatures):  # each distinct domain once, over its samples
        rows = torch.tensor([s is signature for s in signatures], device=best.device)
        p_score = _cdf(signature.score_quantiles, best[rows])
        p_energy = _cdf(signature.energy_quantiles, energies[rows])
        out[rows] = best[rows].float() + a * (p_score + OPEN_FLOOR).log() + b * (p_energy + OPEN_FLOOR).log()
    return out


def user_level() -> int:
    """The warnings `stacklevel` of the first caller outside adapterkit and torch: a warning names the
    user's line, whichever of adapterkit's functions led to it."""
    skip = (str(Path(__file__).parent), str(Path(torch.__file__).parent))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
