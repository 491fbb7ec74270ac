"""Shared basis on the real sequence: parameters vs mean accuracy of every way to share adapters.

Backbone: a real CIFAR ResNet (`--backbone`, weights from `--data-root`/resnet_cifar10); the five real
domains in `--order` (examples/data.py loaders), each trained for `--steps` optimizer steps of `--batch`
images (SGD 0.9, lr 0.1 for every tensor, cosine, weight decay "auto"). Families:

- full:         the paper's parallel adapters, one full alpha per adapted conv and domain;
- joint-svd:    the full family compressed jointly at K = `--joint` (shares of C), evaluated as is and
                after `--finetune-steps` steps of each domain's gamma (+ norms, head), beta frozen;
- projection:   the full family's adapters appended one domain after another, each projected on the
                basis plus at most `--projection` (share of C) new columns per layer (or, with
                `--projection-energy e`, as many as keep that share of the residual's energy), then its gamma
                (+ norms, head) fine-tuned for `--finetune-steps` steps; old domains frozen;
- factored:     each domain trained directly in factored form (`train_domain(factored=True,
                new_columns=b)` for b in `--factored`: gamma on the frozen basis plus b*C own columns
                per layer), then shared exactly with `append_domain`.

- full+ft (`--full-finetune`): the control, every full domain trained `--finetune-steps` more.

After every addition to a projection or factored family, every earlier domain's logits on a fixed probe
batch are compared bit for bit. Writes one JSON point per (family, budget), after every point, and, with
`--plot`, the Pareto plot (adapterkit.plots) of one or more JSON files.

The full family does not depend on the order: train it once (`--save-full DIR`; `--full-domains` trains
and saves only some domains, so parts can train side by side) and derive every other family from it in
other runs (`--load-full DIR [DIR ...]`, the parts merged).

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


def config(name: str, steps: int, batch: int, lr: float = 0.1, seed: int = 0) -> TrainConfig:
    flip = name not in NO_FLIP
    return TrainConfig(
        steps=steps, batch_size=batch, lr=lr, flip=flip, progress=False, threads=1, check_images=100,
        seed=seed,
    )  # fmt: skip


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


class Points(list):
    """The points so far, written to `out` (with the run's record) after every one: a cut run keeps them."""

    def __init__(self, write) -> None:
        super().__init__()
        self.write = write

    def append(self, p: dict) -> None:
        super().append(p)
        self.write(self)


def full_family(args: argparse.Namespace, data: dict, plain: AdapterModel, weights: Path, points: Points):
    """Trains the full family (or the `--full-domains` part of it, then None), or loads `--load-full`."""
    if args.load_full:
        full = load_full(args.load_full, args.order, create_backbone(args.backbone, pretrained=weights))
        if args.skip_full_eval:  # another run loading the same folders reports it
            return full
        points.append(
            point("full", "-", full, accuracies(full, data), loaded=[str(f) for f in args.load_full])
        )
        return full
    t0, full = time.time(), copy.deepcopy(plain)
    for name in args.full_domains or args.order:
        m = train_domain(
            full, name, data[name][0], config=config(name, args.steps, args.batch, seed=args.seed)
        )
        print(f"trained full {name}: {m['seconds']:.0f} s", flush=True)
    if args.save_full:
        full.save_pretrained(args.save_full)
    if args.full_domains:  # part of a family, to be merged with --load-full: no point of its own
        return None
    points.append(point("full", "-", full, accuracies(full, data), seconds=time.time() - t0))
    return full


def run(args: argparse.Namespace, points: Points) -> None:
    data = load(args.data_root, args.order, args.train_limit, args.test_limit, args.omniglot_classes)
    weights = args.data_root / "resnet_cifar10" / f"{args.backbone.split('_')[-1]}.safetensors"
    plain = AdapterModel(create_backbone(args.backbone, pretrained=weights))
    cfg = lambda n, steps: config(n, steps, args.batch, seed=args.seed)  # noqa: E731
    ft = lambda n: config(n, args.finetune_steps, args.batch, args.finetune_lr, args.seed)  # noqa: E731
    full = full_family(args, data, plain, weights, points)
    if full is None:
        return
    if args.full_finetune:  # the control: full adapters given the same extra steps as the +ft families
        more = copy.deepcopy(full)
        for name in args.order:
            train_domain(more, name, data[name][0], config=ft(name), resume=True)
        points.append(point("full+ft", "-", more, accuracies(more, data)))
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
    budgets = [(f"{b}C", {"new_columns": b}) for b in args.projection]
    budgets += [(f"energy {e}", {"energy": e}) for e in args.projection_energy]
    for label, budget in budgets:
        seq = Sequence(copy.deepcopy(full), 32)
        for name in args.order:
            append_domain(seq.model, name, **budget)
            if args.finetune_steps:  # 0: the projection as is
                train_domain(seq.model, name, data[name][0], config=ft(name), resume=True)
            seq.added(name)
        family = "projection+ft" if args.finetune_steps else "projection"
        points.append(
            point(family, label, seq.model, accuracies(seq.model, data), bit_identical=seq.identical)
        )
    for k in args.joint:
        joint = copy.deepcopy(full)
        compress(joint, basis_rank=k)
        points.append(point("joint-svd", f"K={k}C", joint, accuracies(joint, data)))
        for name in args.order:
            train_domain(joint, name, data[name][0], config=ft(name), resume=True)
        points.append(point("joint-svd+ft", f"K={k}C", joint, accuracies(joint, data)))


def load_full(folders: list[Path], order: list[str], backbone: torch.nn.Module) -> AdapterModel:
    """A saved full family, merged from one or more folders (each a part of the domains, same backbone)."""
    model = AdapterModel.from_pretrained(folders[0], backbone=backbone)
    for folder in folders[1:]:
        for name in sorted(f.stem for f in (folder / "domains").glob("*.safetensors")):
            model.load_domain(folder, name)
    if sorted(model.domains) != sorted(order):
        raise ValueError(f"--load-full {folders} holds {model.domains}, not the --order {order}")
    return model


def label(family: str, cfg: dict) -> str:
    """The family with its training budget: steps per domain, plus fine-tuning steps for the +ft ones."""
    steps = f"{cfg['steps']}+{cfg['finetune_steps']}" if family.endswith("+ft") else f"{cfg['steps']}"
    lr = cfg.get("finetune_lr", 0.1)
    return f"{family} ({steps} steps{f', ft lr {lr}' if family.endswith('+ft') and lr != 0.1 else ''})"


def plot(out: Path, files: list[Path]) -> None:
    """One Pareto plot of every point in `files` (the first file's order names the plot)."""
    from adapterkit.plots import pareto_plot

    runs = [json.loads(f.read_text()) for f in files]
    series: dict[str, list] = {}
    for run in runs:
        for p in run["points"]:
            budget = None if p["budget"] == "-" else p["budget"]
            point = (p["relative_parameters"], 100 * p["mean"], budget)
            drawn = series.setdefault(label(p["family"], run["config"]), [])
            if point not in drawn:  # every run loading the same saved full family reports it again
                drawn.append(point)
    # Lines join each family's budgets left to right.
    series = {name: sorted(points, key=lambda q: q[0]) for name, points in series.items()}
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
    p.add_argument("--finetune-steps", type=int, default=30, help="0: projections evaluated as they are")
    p.add_argument("--finetune-lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="training seed (head init, batch order, augmentation)")
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--omniglot-classes", type=int, default=100)
    p.add_argument("--joint", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    p.add_argument("--projection", type=float, nargs="*", default=[0.125, 0.25])
    p.add_argument(
        "--projection-energy",
        type=float,
        nargs="*",
        default=[],
        help="also project with columns per layer by the share of the residual's energy they keep",
    )
    p.add_argument("--factored", type=float, nargs="*", default=[0.0625, 0.125, 0.1875])
    p.add_argument("--save-full", type=Path, default=None, help="save the trained full family here")
    p.add_argument(
        "--full-domains",
        nargs="+",
        default=None,
        choices=ORDER,
        help="train (and save) only these full domains, nothing else: parts to merge with --load-full",
    )
    p.add_argument(
        "--load-full",
        type=Path,
        nargs="+",
        default=None,
        help="family folders (parts) of the full family saved by --save-full, instead of training it",
    )
    p.add_argument(
        "--skip-full-eval", action="store_true", help="with --load-full: no point for the full family"
    )
    p.add_argument(
        "--full-finetune",
        action="store_true",
        help="also the full family with every domain trained --finetune-steps more (the +ft control)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/basis_sequence.json"))
    p.add_argument("--plot", type=Path, default=None, help="write the Pareto plot of the JSON files given")
    p.add_argument("files", type=Path, nargs="*")
    args = p.parse_args()
    if args.plot:
        return plot(args.plot, args.files)
    torch.set_num_threads(1)
    t0 = time.time()
    config_ = {k: v for k, v in vars(args).items() if k not in ("plot", "files")}

    def write(points: list[dict]) -> None:
        result = {
            "command": " ".join(sys.argv), "machine": platform.platform(), "torch": torch.__version__,
            "adapterkit": __version__, "seconds": time.time() - t0, "config": config_, "points": points,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")  # Paths as text

    run(args, Points(write))


if __name__ == "__main__":
    main()
