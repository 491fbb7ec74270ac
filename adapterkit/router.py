"""Domain signatures: route an image to its domain when nobody says which, without forgetting.

A domain's signature is a mixture of K diagonal Gaussians (`COMPONENTS`) of the frozen backbone's style
features on that domain's images (per component a weight, a mean and a log-variance per feature: about
2 K F numbers, stored as 8-bit codes) plus a calibrated threshold: the score below
which only `REJECT` of the domain's own images fall. Each signature is fitted from its own domain's images
alone and never changes afterwards, so adding or removing a domain changes no other domain's signature,
bit for bit: routing is incremental, with nothing shared to retrain.

Routing costs one pass of the plain frozen backbone (the features every signature reads) plus O(F) per
domain: with the domain's own forward, at most 2 forwards per image whatever the number of domains.
The score of domain d is the mixture's log-likelihood divided by F; the chosen domain is the best
score, its confidence the posterior under equal priors, and a sample whose best score is below that
domain's threshold is unknown (None).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import AdapterModel

SIGNATURE_SHARE = 0.01  # a signature's bytes at most, as a share of its domain's (fit_signature's budget)
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
    K), and its unknown-sample `threshold`. A signature loaded from a file keeps the file's storage (those
    written before codes stay half precision or float32, bit for bit)."""

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

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        state_dict.setdefault(prefix + "maps", torch.tensor(0, dtype=torch.int32))  # written before `maps`
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
    ) -> DomainSignature:
        """The signature of `features` (N x F, N >= 4 per component), fitted by EM from a fixed seed
        (the same features always give the same signature). The threshold is calibrated out of sample:
        the `reject` quantile of the scores of every other row under a mixture fitted on the remaining
        rows (scores of the rows a model was fitted on are optimistic when F is close to N). With
        `max_bytes` (e.g. 1 % of the domain's adapter bytes) it uses as many components as fit in it, at
        least one."""
        if features.dim() != 2 or features.shape[0] < 4:
            raise ValueError(
                f"a signature needs at least 4 feature rows (N x F), got shape {tuple(features.shape)}"
            )
        components = max(1, min(components, features.shape[0] // 8))
        for form in FORMS:
            k = components
            if max_bytes is not None:
                per_component, fixed = _bytes(form, features.shape[1])
                k = max(1, min(components, (max_bytes - fixed) // per_component))
            signature = cls._mixture(features, k)
            exact = signature.score(features)
            if (signature._store(form).score(features) - exact).abs().max() <= ROUNDING:
                break
        held_out = cls._mixture(features[0::2], k)._store(form).score(features[1::2])
        signature.threshold.copy_(torch.quantile(held_out, reject))
        return signature

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


@dataclass
class Route:
    """Where `AdapterModel.route` sends each sample.

    Attributes:
        domains: the chosen domain per sample, or None when the sample fits no known domain.
        best: the best-scoring domain per sample, even when it is unknown.
        confidence: posterior of the best domain under equal priors (N,).
        scores: per-domain scores (N x D), columns in `names` order.
        names: the domains that have a signature.
    """

    domains: list[str | None]
    best: list[str]
    confidence: torch.Tensor
    scores: torch.Tensor
    names: list[str]


def route(features: torch.Tensor, signatures: dict[str, DomainSignature]) -> Route:
    """Score `features` (N x F, `style_features` of `feature_maps(signatures)`) against every signature;
    see the module docstring."""
    names = list(signatures)
    wrong = unreadable(signatures, features.shape[1])
    if wrong:
        raise ValueError(
            f"the signatures of {wrong} were fitted on other features ({signatures[wrong[0]].num_features} vs "
            f"{features.shape[1]}): another backbone or adapterkit version; refit them with model.fit_signature"
        )
    scores = torch.stack([signatures[n].score(features) for n in names], dim=1)
    return decide(scores, signatures)


def feature_maps(signatures: dict[str, DomainSignature]) -> int:
    """The feature maps every signature reads (`maps` of `style_features`): one pass serves all of them,
    so they must agree."""
    maps = {name: int(s.maps) for name, s in signatures.items()}
    if len(set(maps.values())) > 1:
        raise ValueError(
            f"the signatures read different feature maps ({maps}; 0: every stage's but the last), so one "
            "pass cannot score them all: refit them with one `maps` (model.fit_signature(..., maps=))"
        )
    return next(iter(maps.values()), 0)


def unreadable(signatures: dict[str, DomainSignature], width: int) -> list[str]:
    """The signatures that features `width` wide cannot score: fitted on other features (another
    backbone, or an adapterkit before the layout features of `style_features`: refit them)."""
    return [n for n, s in signatures.items() if s.num_features != width]


def decide(scores: torch.Tensor, signatures: dict[str, DomainSignature]) -> Route:
    """The route from per-domain scores (N x D, columns in `signatures` order; -inf for a domain not
    scored on a sample): the best domain, its confidence, and None where the best score is below that
    domain's threshold. The inference service scores each domain on its own preprocessing and decides
    here (serve_route.py)."""
    names = list(signatures)
    num_features = next(iter(signatures.values())).num_features
    top, index = scores.max(dim=1)
    confidence = torch.softmax(scores * num_features, dim=1).gather(1, index[:, None])[:, 0]
    thresholds = torch.stack([signatures[n].threshold for n in names]).to(scores.device)[index]
    best = [names[i] for i in index.tolist()]
    known = (top >= thresholds).tolist()
    return Route(
        [b if k else None for b, k in zip(best, known, strict=True)],
        best,
        confidence.nan_to_num(0.0),  # a sample no domain could score
        scores,
        names,
    )


def style_features(backbone: nn.Module, x: torch.Tensor, maps: int = 0) -> torch.Tensor:
    """What signatures read: per channel, the spatial mean and log standard deviation of the stem's and
    every stage's output but the last (what tells a digit from a traffic sign is image statistics, which
    the early stages carry; on the real sequence dropping the last stage routed better, and the pass
    stops there: two thirds of a CIFAR ResNet's FLOPs, 0.82x of its time), then for each of those maps the
    mean of its central half minus its mean (layout: an object in the middle, or a texture everywhere;
    mean routing 0.956 -> 0.969 on the real sequence). `maps` > 0 reads the first `maps` of timm's
    `feature_info` maps instead (the stem is the first): a shorter pass, for larger images, where the
    early maps route as well (docs/routing.md). Backbones with one stage read it; backbones without
    timm's `forward_intermediates` give their pooled features only."""
    if not hasattr(backbone, "forward_intermediates"):
        return backbone(x).flatten(1).float()
    take = list(range(maps if maps > 0 else max(_feature_map_count(backbone) - 1, 1)))
    rows, centres = [], []
    for t in backbone.forward_intermediates(x, indices=take, stop_early=True, intermediates_only=True):
        t = t.float()
        flat = t.flatten(2) if t.dim() == 4 else t.transpose(1, 2)  # (N, C, positions)
        mean = flat.mean(dim=2)
        rows += [mean, (flat.std(dim=2, correction=0) + 1e-5).log()]
        if t.dim() == 4:  # tokens have no layout
            h, w = t.shape[2:]
            centres.append(t[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4].mean(dim=(2, 3)) - mean)
    return torch.cat(rows + centres, dim=1)


def _feature_map_count(backbone: nn.Module) -> int:
    return len(getattr(backbone, "feature_info", ())) or 1


def collect_features(
    model: AdapterModel, batches: Iterable[torch.Tensor], limit: int = MAX_IMAGES, maps: int = 0
) -> torch.Tensor:
    """`style_features` (of `maps`) of the plain frozen backbone (no domain) for up to `limit` images, in
    eval mode."""
    count = _feature_map_count(model.backbone)
    if isinstance(maps, bool) or not isinstance(maps, int) or not 0 <= maps <= count:
        raise ValueError(f"maps={maps!r}: use 0 (the default) or 1-{count}, the backbone's feature maps")
    rows, seen = [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                rows.append(style_features(model.backbone, x[: limit - seen], maps))
                seen += rows[-1].shape[0]
                if seen >= limit:
                    break
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("no images to fit a signature on")
    return torch.cat(rows)
