"""Domains one after another: the accuracy matrix, ACC/BWT/forgetting, costs, and two baselines.

`train_sequence` trains each domain of a list in order on one `AdapterModel` and, after each, checks
every domain trained so far: row i of `R` (accuracy on domain j after training domain i). With
adapterkit's invariant the columns never change, so BWT and forgetting are exactly 0. By default the
check after each domain is cheap and exact: each earlier domain's logits on a fixed probe batch of its
test images are compared bit for bit with those it gave when it was trained (a domain whose probe
changed is evaluated again on its full test set); the last row evaluates every domain on its full
test set. With trackers (`log_with`), every row is logged (`sequence/accuracy/<domain>`).

Baselines, for the Visual Decathlon score and the paper's comparison table:

* `finetune_baseline`: a separate copy of the backbone per domain, every weight fine-tuned (the
  paper's "10x" row: ten backbones for ten domains); its errors are the Decathlon score's `E_base`.
* `linear_probe_baseline`: the frozen backbone's features with one linear head per domain.

Separate models per domain cannot forget, so the baselines' matrices are filled from their diagonals.

Example:
    >>> domains = [DomainSpec("gtsrb", gtsrb_train, gtsrb_test, config=TrainConfig(flip=False)), ...]
    >>> result = train_sequence(model, domains)
    >>> print(result.report)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import AdapterConfig
from .data import DomainDataset, open_data
from .inject import create_backbone
from .metrics import ContinualReport, decathlon_score, format_table
from .model import AdapterModel
from .train import TrainConfig, evaluate, make_accelerator, train_domain, train_model
from .train_env import seeded
from .transforms import Preprocess

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

REEVALUATE = ("probe", "full", "none")
# The fine-tuning baseline's backbone trains at this multiple of `lr` (the paper trains the backbone slower
# than the head, which runs at `head_lr_scale`: 2 by default). Measured on GTSRB (benchmarks/bench_recipe.py):
# backbone 0.05 and head 0.2: 81.6 %; backbone 0.05 and head 0.1: 69.8; backbone 0.01, head 0.1: 53.8;
# 0.05 everywhere: 65.8.
FINETUNE_BACKBONE_LR_SCALE = 0.5


@dataclass
class DomainSpec:
    """One domain of a sequence: its name, data, classes and training options.

    Args:
        name: the domain's name.
        train: training data (any kind `train_domain` accepts).
        test: test data, evaluated after this and every later domain.
        num_classes: default: from the data.
        labels: class names (default: the data's).
        config: per-domain training options (epochs, flip, weight decay, ...).
        data_config: per-domain overrides of timm's data config (e.g. `{"input_size": 64}`).
    """

    name: str
    train: Any
    test: Any
    num_classes: int | None = None
    labels: list[str] | None = None
    config: TrainConfig | None = None
    data_config: dict[str, Any] | None = None


@dataclass
class SequenceResult:
    """The accuracy matrix of one method over a sequence, with costs and training metrics.

    Attributes:
        method: a label (`adapters (parallel)`, `fine-tuning`, `linear probe`).
        report: ACC, BWT, forgetting and the matrix.
        costs: per domain `parameters`, `bytes` and `fraction_of_backbone` it adds.
        metrics: per domain, what training returned.
        backbone_parameters: parameters of one backbone (the unit of "#par").
        unchanged: per domain trained before the last, whether its probe logits stayed bit-identical
            after every later domain (empty when no probe was checked).
    """

    method: str
    report: ContinualReport
    costs: dict[str, dict[str, float]]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    backbone_parameters: int = 0
    unchanged: dict[str, bool] = field(default_factory=dict)

    @property
    def accuracies(self) -> dict[str, float]:
        """Accuracy per domain after the last domain was trained."""
        return dict(zip(self.report.names, map(float, self.report.matrix[-1]), strict=True))

    def errors(self) -> dict[str, float]:
        return {name: 1.0 - acc for name, acc in self.accuracies.items()}

    def total_parameters(self) -> float:
        """Parameters of the whole system in backbones (the paper's "#par": 1 + what the domains add)."""
        shared = 0.0 if self.method == "fine-tuning" else 1.0
        return shared + sum(c["fraction_of_backbone"] for c in self.costs.values())

    def decathlon(
        self, baseline_errors: dict[str, float], floor: float = 0.0
    ) -> tuple[float, dict[str, float]]:
        """Visual Decathlon score against a baseline's errors (`floor` keeps a perfect baseline's error
        above 0, where the score is undefined; e.g. half an image: 0.5 / test images)."""
        base = {name: max(err, floor) for name, err in baseline_errors.items()}
        return decathlon_score(self.errors(), base)

    def cost_table(self) -> str:
        rows = [
            [
                name,
                c["parameters"],
                f"{100 * c['fraction_of_backbone']:.2f}%",
                c["bytes"],
                self.accuracies[name],
            ]
            for name, c in self.costs.items()
        ]
        return format_table(rows, ["domain", "parameters", "of backbone", "bytes", "accuracy"])


def train_sequence(
    model: AdapterModel,
    domains: Sequence[DomainSpec],
    *,
    config: TrainConfig | None = None,
    accelerator: Accelerator | None = None,
    reevaluate: str = "probe",
    probe_size: int = 64,
    method: str | None = None,
) -> SequenceResult:
    """Train `domains` in order on `model`; after each, check every domain trained so far.

    Args:
        config: the default `TrainConfig` for domains without their own.
        accelerator: one `Accelerator` for the whole sequence (default: made from the first config).
        reevaluate: how earlier domains are checked after each new one: `"probe"` (their logits on
            the first `probe_size` test images compared bit for bit; an unchanged domain keeps its
            accuracy, a changed one is evaluated again on its full test set; the last row evaluates
            every domain on its full test set), `"full"` (full test sets after every domain) or
            `"none"` (the matrix from the diagonal: only for separate models per domain).
    """
    _check_names(domains)
    if reevaluate not in REEVALUATE:
        raise ValueError(f"reevaluate={reevaluate!r}: use one of {REEVALUATE}")
    default = config or TrainConfig()
    acc = accelerator or make_accelerator(domains[0].config or default)
    own_trackers = _start_trackers(acc, domains[0].config or default, method or model.config.topology)
    rows: list[list[float]] = []
    metrics: dict[str, dict[str, float]] = {}
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unchanged: dict[str, bool] = {}
    try:
        for i, spec in enumerate(domains):
            cfg = spec.config or default
            logger.info("domain %d/%d: %s", i + 1, len(domains), spec.name)
            metrics[spec.name] = train_domain(
                model,
                spec.name,
                spec.train,
                spec.test,
                cfg,
                num_classes=spec.num_classes,
                labels=spec.labels,
                data_config=spec.data_config,
                accelerator=acc,
            )
            if reevaluate == "probe":
                probes[spec.name] = _probe(model, spec, cfg, acc, probe_size)
            rows.append(
                _matrix_row(model, domains, i, rows, metrics, probes, unchanged, reevaluate, default, acc)
            )
            _log_row(acc, domains, rows[-1], i)
    finally:
        if own_trackers:
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers.clear()  # finished: a later sequence on this accelerator starts its own run
    names = [d.name for d in domains]
    costs = {name: model.domain_cost(name) for name in names}
    label = method or f"adapters ({model.config.topology})"
    report = ContinualReport.from_matrix(rows, names)
    return SequenceResult(label, report, costs, metrics, model.backbone_parameter_count(), unchanged)


def _matrix_row(
    model: AdapterModel,
    domains: Sequence[DomainSpec],
    i: int,
    rows: list[list[float]],
    metrics: dict[str, dict[str, float]],
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]],
    unchanged: dict[str, bool],
    reevaluate: str,
    default: TrainConfig,
    acc: Accelerator,
) -> list[float]:
    """Row `i` of the accuracy matrix, after training domain `i` (see `train_sequence`'s `reevaluate`);
    records in `unchanged` whether each earlier domain's probe logits stayed bit-identical."""
    last = i == len(domains) - 1
    row = []
    for j, old in enumerate(domains[: i + 1]):
        full = reevaluate == "full" or (reevaluate == "probe" and last)
        if reevaluate == "probe" and j < i:
            same = _same_logits(model, old.name, probes[old.name], acc)
            unchanged[old.name] = unchanged.get(old.name, True) and same
            full = full or not same
        if j == i:
            row.append(metrics[old.name]["accuracy"])
        elif full:
            row.append(evaluate(model, old.test, old.name, config=old.config or default, accelerator=acc))
        else:
            row.append(rows[j][j])
    return row


def linear_probe_baseline(
    backbone: str,
    domains: Sequence[DomainSpec],
    *,
    pretrained: bool | str | Path = False,
    overrides: dict[str, Any] | None = None,
    accelerator: Accelerator | None = None,
) -> SequenceResult:
    """One linear head per domain on the frozen backbone's features (nothing else is trained).

    `overrides` replace fields of every domain's `TrainConfig` (for example `{"lr": 0.01}`).
    """
    model = AdapterModel.from_backbone(
        backbone, AdapterConfig(overrides={"*": "frozen"}), pretrained=pretrained
    )
    domains = [replace(d, config=replace(d.config or TrainConfig(), **(overrides or {}))) for d in domains]
    return train_sequence(model, domains, accelerator=accelerator, reevaluate="none", method="linear probe")


def finetune_baseline(
    backbone: str,
    domains: Sequence[DomainSpec],
    *,
    pretrained: bool | str | Path = False,
    overrides: dict[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    backbone_lr_scale: float = FINETUNE_BACKBONE_LR_SCALE,
) -> SequenceResult:
    """A fresh copy of the backbone per domain with every weight (BatchNorm statistics included)
    fine-tuned: the paper's full fine-tuning baseline, its backbone at `backbone_lr_scale` times the
    head's lr. `overrides` as in `linear_probe_baseline` (they win over `backbone_lr_scale`)."""
    _check_names(domains)
    rows: list[list[float]] = []
    costs: dict[str, dict[str, float]] = {}
    metrics: dict[str, dict[str, float]] = {}
    acc = accelerator
    unit = 0
    for i, spec in enumerate(domains):
        fields = {"backbone_lr_scale": backbone_lr_scale} | (overrides or {})
        cfg = replace(spec.config or TrainConfig(), **fields)
        acc = acc or make_accelerator(cfg)
        net = create_backbone(backbone, pretrained)
        unit = sum(p.numel() for p in net.parameters()) - sum(
            p.numel() for p in net.get_classifier().parameters()
        )
        num_classes = spec.num_classes or _classes(spec, cfg)
        with seeded(cfg.seed, torch.device("cpu")):  # the head from the config's seed, not the caller's RNG
            net.reset_classifier(num_classes)
        logger.info("fine-tuning %d/%d: %s", i + 1, len(domains), spec.name)
        metrics[spec.name] = train_model(
            net, spec.train, spec.test, cfg, name=spec.name, data_config=spec.data_config, accelerator=acc
        )
        rows.append([rows[j][j] for j in range(i)] + [metrics[spec.name]["accuracy"]])
        params = sum(p.numel() for p in net.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
        costs[spec.name] = {"parameters": params, "bytes": nbytes, "fraction_of_backbone": params / unit}
    names = [d.name for d in domains]
    return SequenceResult("fine-tuning", ContinualReport.from_matrix(rows, names), costs, metrics, unit)


def comparison_table(results: Sequence[SequenceResult], baseline: SequenceResult, floor: float = 0.0) -> str:
    """One row per method: ACC, BWT, forgetting, #par (in backbones) and the Decathlon score against
    `baseline`'s errors (normally the fine-tuning baseline)."""
    base = baseline.errors()
    rows = []
    for r in results:
        score, _ = r.decathlon(base, floor)
        rows.append(
            [
                r.method,
                r.report.acc,
                r.report.bwt,
                r.report.forgetting,
                f"{r.total_parameters():.3f}x",
                round(score, 1),
            ]
        )
    return format_table(rows, ["method", "ACC", "BWT", "forgetting", "#par", "Decathlon"])


def _probe(
    model: AdapterModel, spec: DomainSpec, cfg: TrainConfig, acc: Accelerator, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` test images of `spec` as its domain preprocesses them, and their logits."""
    source = open_data(spec.test, cfg.image_column, cfg.label_column)
    pre = Preprocess(model.domain_info(spec.name).data_config, grayscale=cfg.grayscale)
    dataset = DomainDataset(source, pre)
    x = torch.stack([dataset[k][0] for k in range(min(size, len(dataset)))]).to(acc.device)
    return x, _logits(model, spec.name, x, acc)


@torch.no_grad()
def _logits(model: AdapterModel, domain: str, x: torch.Tensor, acc: Accelerator) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with acc.autocast():
            return model(x, domain=domain).float().cpu()
    finally:
        model.train(was_training)


def _same_logits(
    model: AdapterModel, domain: str, probe: tuple[torch.Tensor, torch.Tensor], acc: Accelerator
) -> bool:
    """Whether `domain` still gives its probe batch exactly the logits it gave when trained."""
    x, before = probe
    same = torch.equal(_logits(model, domain, x, acc), before)
    if not same:
        logger.warning("domain %r changed on its probe batch: evaluating it on its full test set", domain)
    return same


def _start_trackers(acc: Accelerator, config: TrainConfig, name: str) -> bool:
    """One tracker run for the whole sequence (its domains' trainings log into it); False when the
    config has no trackers or the accelerator already runs some (the caller's)."""
    if not config.log_with or acc.trackers:
        return False
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
    acc.init_trackers(f"adapterkit-sequence-{name}".replace(" ", "-"), config=flat)
    return True


def _log_row(acc: Accelerator, domains: Sequence[DomainSpec], row: list[float], i: int) -> None:
    """Row i of the accuracy matrix: every domain's accuracy after domain i, and their mean."""
    done = domains[: i + 1]
    logger.info(
        "after %s: %s", done[-1].name, ", ".join(f"{d.name} {a:.4f}" for d, a in zip(done, row, strict=True))
    )
    values = {f"sequence/accuracy/{d.name}": a for d, a in zip(done, row, strict=True)}
    acc.log(values | {"sequence/mean_accuracy": sum(row) / len(row)}, step=i + 1)


def _check_names(domains: Sequence[DomainSpec]) -> None:
    names = [d.name for d in domains]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"domains need distinct names, at least one: got {names}")


def _classes(spec: DomainSpec, cfg: TrainConfig) -> int:
    from .data import open_data

    source = open_data(spec.train, cfg.image_column, cfg.label_column)
    return len(source.class_names) if source.class_names else int(source.labels().max()) + 1
