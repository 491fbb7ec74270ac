"""Shared basis on the real sequence: parameters vs mean accuracy of every way to share adapters.

Backbone: a real CIFAR ResNet (`--backbone`, weights from `--data-root`/resnet_cifar10); the five real
domains in `--order` (examples/data.py loaders), each trained for `--steps` optimizer steps of `--batch`
images (SGD 0.9, lr 0.1 for every tensor, cosine, weight decay "auto"). Families:

- full:         the paper's parallel adapters, one full alpha per adapted conv and domain;
- joint-svd:    the full family compressed jointly at K = `--joint` (shares of C), evaluated as is and
                after `--finetune-steps` steps of each domain's gamma (+ norms, head), beta frozen;
- projection:   the full family's adapters appended one domain after another, each projected on the
                basis plus at most `--projection` (share of C) new columns per layer, then its gamma
                (+ norms, head) fine-tuned for `--finetune-steps` steps; old domains frozen;
- factored:     each domain trained directly in factored form (`train_domain(factored=True,
                new_columns=b)` for b in `--factored`: gamma on the frozen basis plus b*C own columns
                per layer), then shared exactly with `append_domain`.

After every addition to a projection or factored family, every earlier domain's logits on a fixed probe
batch are compared bit for bit. Writes one JSON point per (family, budget) and, with `--plot`, the Pareto
plot (adapterkit.plots) of one or more JSON files.

    OMP_NUM_THREADS=1 python benchmarks/bench_basis_sequence.py --out benchmarks/results/basis_sequence.json
    python benchmarks/bench_basis_sequence.py --plot docs/img/basis_pareto.png benchmarks/results/basis_sequence*.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterModel, __version__  # noqa: E402
from adapterkit.compress import append_domain, compress, parameter_report  # noqa: E402
from adapterkit.inject import create_backbone  # noqa: E402
from adapterkit.train import TrainConfig, evaluate, train_domain  # noqa: E402

ORDER = ["omniglot", "gtsrb", "mnist", "dtd10", "flowers90"]
NO_FLIP = {"omniglot", "gtsrb", "mnist"}


def load(root: Path, order: list[str], train_limit: int, test_limit: int, omniglot: int) -> dict:
    data = {}
    for name in order:
        kwargs = {"num_classes": omniglot} if name == "omniglot" else {}
        splits = (("train", train_limit), ("test", test_limit))
        data[name] = [DOMAINS[name](root, s, limit=n, **kwargs) for s, n in splits]
    return data


def config(name: str, steps: int, batch: int) -> TrainConfig:
    flip = name not in NO_FLIP
    return TrainConfig(
        steps=steps, batch_size=batch, lr=0.1, flip=flip, progress=False, threads=1, check_images=100
    )


def accuracies(model: AdapterModel, data: dict) -> dict[str, float]:
    cfg = TrainConfig(progress=False, eval_batch_size=500, threads=1)
    return {n: evaluate(model, data[n][1], n, config=cfg) for n in model.domains}


class Sequence:
    """Adds domains to a family one at a time and checks every earlier domain bit for bit on a probe."""

    def __init__(self, model: AdapterModel, size: int) -> None:
        self.model, self.identical, self.seen = model, True, {}
        self.probe = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))

    def added(self, name: str) -> None:
        self.model.eval()
        with torch.no_grad():
            for old, logits in self.seen.items():
                self.identical &= torch.equal(self.model(self.probe, domain=old), logits)
            self.seen[name] = self.model(self.probe, domain=name)


def point(family: str, budget: str, model: AdapterModel, acc: dict, **extra) -> dict:
    mean = sum(acc.values()) / len(acc)
    params = parameter_report(model)
    print(f"{family:14s} {budget:8s} {params['relative']:.3f}x  mean {100 * mean:.2f}  {extra}", flush=True)
    return {"family": family, "budget": budget, "relative_parameters": params["relative"], "mean": mean,
            "accuracy": acc, "parameters": params, **extra}  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    data = load(args.data_root, args.order, args.train_limit, args.test_limit, args.omniglot_classes)
    weights = args.data_root / "resnet_cifar10" / f"{args.backbone.split('_')[-1]}.safetensors"
    plain = AdapterModel(create_backbone(args.backbone, pretrained=weights))
    cfg = lambda n, steps: config(n, steps, args.batch)  # noqa: E731
    points, t0 = [], time.time()
    full = copy.deepcopy(plain)
    for name in args.order:
        train_domain(full, name, data[name][0], config=cfg(name, args.steps))
    points.append(point("full", "-", full, accuracies(full, data), seconds=time.time() - t0))
    for b in args.factored:
        t1, seq = time.time(), Sequence(copy.deepcopy(plain), 32)
        for name in args.order:
            train_domain(
                seq.model, name, data[name][0], config=cfg(name, args.steps), factored=True, new_columns=b
            )
            append_domain(seq.model, name)  # exact: its own columns handed over as they are
            seq.added(name)
        acc = accuracies(seq.model, data)
        points.append(
            point("factored", f"{b}C", seq.model, acc, bit_identical=seq.identical, seconds=time.time() - t1)
        )
    for b in args.projection:
        seq = Sequence(copy.deepcopy(full), 32)
        for name in args.order:
            append_domain(seq.model, name, new_columns=b)
            train_domain(seq.model, name, data[name][0], config=cfg(name, args.finetune_steps), resume=True)
            seq.added(name)
        points.append(
            point(
                "projection+ft", f"{b}C", seq.model, accuracies(seq.model, data), bit_identical=seq.identical
            )
        )
    for k in args.joint:
        joint = copy.deepcopy(full)
        compress(joint, basis_rank=k)
        points.append(point("joint-svd", f"K={k}C", joint, accuracies(joint, data)))
        for name in args.order:
            train_domain(joint, name, data[name][0], config=cfg(name, args.finetune_steps), resume=True)
        points.append(point("joint-svd+ft", f"K={k}C", joint, accuracies(joint, data)))
    return points


def label(family: str, cfg: dict) -> str:
    """The family with its training budget: steps per domain, plus fine-tuning steps for the +ft ones."""
    steps = f"{cfg['steps']}+{cfg['finetune_steps']}" if family.endswith("+ft") else f"{cfg['steps']}"
    return f"{family} ({steps} steps)"


def plot(out: Path, files: list[Path]) -> None:
    """One Pareto plot of every point in `files` (the first file's order names the plot)."""
    from adapterkit.plots import pareto_plot

    runs = [json.loads(f.read_text()) for f in files]
    series: dict[str, list] = {}
    for run in runs:
        for p in run["points"]:
            budget = None if p["budget"] == "-" else p["budget"]
            point = (p["relative_parameters"], 100 * p["mean"], budget)
            series.setdefault(label(p["family"], run["config"]), []).append(point)
    cfg = runs[0]["config"]
    pareto_plot(series, out, title=f"{cfg['backbone']}: {' > '.join(n[:5] for n in cfg['order'])}")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--backbone", default="cifar_resnet20")
    p.add_argument("--order", nargs=5, default=ORDER, choices=ORDER)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--omniglot-classes", type=int, default=100)
    p.add_argument("--joint", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    p.add_argument("--projection", type=float, nargs="*", default=[0.125, 0.25])
    p.add_argument("--factored", type=float, nargs="*", default=[0.0625, 0.125, 0.1875])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/basis_sequence.json"))
    p.add_argument("--plot", type=Path, default=None, help="write the Pareto plot of the JSON files given")
    p.add_argument("files", type=Path, nargs="*")
    args = p.parse_args()
    if args.plot:
        return plot(args.plot, args.files)
    torch.set_num_threads(1)
    t0 = time.time()
    points = run(args)
    result = {
        "command": " ".join(sys.argv), "machine": platform.platform(), "torch": torch.__version__,
        "adapterkit": __version__, "seconds": time.time() - t0,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("plot", "files")},
        "points": points,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
