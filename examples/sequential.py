"""Sequential real-data run: one frozen CIFAR-10 ResNet-56, five domains trained one after another.

Omniglot -> GTSRB -> MNIST -> DTD-10 -> Flowers-90 on the real CIFAR-10 ResNet-56 (He et al. 2016,
``<data-root>/resnet_cifar10/resnet56.safetensors``) with parallel and series residual adapters, against
two baselines on the same data: full fine-tuning of a separate ResNet-56 per domain (whose errors define
the Visual Decathlon score) and a linear probe on the frozen features. Every method runs for each seed
(``--seeds``); the adapters also for each domain order (``--orders``: the order above, then reversed,
then shuffled); the baselines train one network per domain, so the order cannot change them. Every
method is reported as mean ± std over its runs, with Decathlon scores, and the paper's orderings
(parallel >= series >= fine-tuning > linear probe, on the mean accuracy) are checked, pass or fail.

After each new domain every earlier one is checked on a fixed probe batch, bit for bit (no forgetting);
the final accuracy matrix evaluates every domain on its test set. The unit of budget is optimizer
steps per domain (``--steps``), the same for every method.

Images are resized to the backbone's 32 px (its pretraining resolution; the paper used 72 px for its
ImageNet ResNet-26): 32 px keeps a CPU run short, and ``--image-size 64`` is there for a GPU.

    python examples/sequential.py --quick                 # the smoke test: ~3 min on 1 thread
    python examples/sequential.py --threads 2             # the default budget, sized for ~30 min on 2 free
                                                          # CPU cores (estimated, see docs/benchmarks.md)
    python examples/sequential.py --seeds 0 1 2 --orders 2 --plots figures
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from data import DEFAULT_DATA_ROOT, DOMAINS

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.continual import (
    DomainSpec,
    SequenceResult,
    finetune_baseline,
    linear_probe_baseline,
    train_sequence,
)
from adapterkit.metrics import format_table
from adapterkit.train import TrainConfig, make_accelerator

ORDER = ("omniglot", "gtsrb", "mnist", "dtd10", "flowers90")
NO_FLIP = {"omniglot", "gtsrb", "mnist"}  # glyphs, signs and digits change meaning when mirrored
METHODS = ("parallel", "series", "fine-tuning", "linear probe")
ORDERINGS = (
    ("parallel", "series", ">="),
    ("series", "fine-tuning", ">="),
    ("fine-tuning", "linear probe", ">"),
)
QUICK = dict(train_limit=300, test_limit=200, steps=20, omniglot_classes=50)
DEFAULT = dict(train_limit=None, test_limit=1000, steps=150, omniglot_classes=100)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of the shared data")
    p.add_argument("--quick", action="store_true", help=f"a smoke test: {QUICK}")
    p.add_argument("--steps", type=int, help=f"optimizer steps per domain (default {DEFAULT['steps']})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    p.add_argument("--orders", type=int, default=1, help="domain orders for the adapters (default 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-limit", type=int, help="training images per domain (class-balanced; default all)")
    p.add_argument("--test-limit", type=int, help=f"test images per domain (default {DEFAULT['test_limit']})")
    p.add_argument("--omniglot-classes", type=int, help="first N Omniglot characters (default 100; 0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="adapters and linear probe (SGD 0.9, cosine)")
    p.add_argument("--finetune-lr", type=float, default=0.1, help="fine-tuning (its backbone: x0.5)")
    p.add_argument(
        "--head-lr-scale", type=float, default=2.0, help="every method's head: lr x this (default 2)"
    )
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--log-dir", type=Path, help="log every domain's training and evaluation to TensorBoard here"
    )
    p.add_argument("--plots", type=Path, help="write PNG figures here (needs the plot extra: matplotlib)")
    p.add_argument("--json", type=Path, help="write all results to this JSON file")
    args = p.parse_args()
    for key, value in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_limit, args.test_limit = args.train_limit or None, args.test_limit or None
    args.omniglot_classes = args.omniglot_classes or None
    if args.orders < 1 or args.steps < 1:
        p.error("--orders and --steps must be >= 1")
    return args


def orders(n: int) -> list[tuple[str, ...]]:
    """The first `n` domain orders: the canonical one, reversed, then shuffles with fixed seeds."""
    found = [ORDER, ORDER[::-1]][:n]
    rng = random.Random(0)
    while len(found) < n:
        order = tuple(rng.sample(ORDER, len(ORDER)))
        if order not in found:
            found.append(order)
    return found


def load_domains(args: argparse.Namespace) -> dict[str, DomainSpec]:
    domains = {}
    for name in ORDER:
        kw = {"num_classes": args.omniglot_classes} if name == "omniglot" else {}
        train = DOMAINS[name](args.data_root, "train", limit=args.train_limit, **kw)
        test = DOMAINS[name](args.data_root, "test", limit=args.test_limit, **kw)
        labels = train.features["label"].names
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            head_lr_scale=args.head_lr_scale,
            flip=name not in NO_FLIP,
            mixed_precision=args.mixed_precision,
            num_workers=args.workers,
            eval_batch_size=250,
            progress=False,
            log_with="tensorboard" if args.log_dir else None,
            output_dir=str(args.log_dir) if args.log_dir else None,
        )
        size = {"input_size": args.image_size}
        domains[name] = DomainSpec(name, train, test, len(labels), labels, config, size)
        print(f"{name}: {len(train)} train / {len(test)} test images, {len(labels)} classes")
    return domains


def run_adapters(topology: str, specs: list[DomainSpec], weights: Path, acc) -> SequenceResult:
    model = AdapterModel.from_backbone("cifar_resnet56", AdapterConfig(topology=topology), pretrained=weights)
    result = train_sequence(model, specs, accelerator=acc, method=topology)
    print(f"\n== {topology} adapters, order {' -> '.join(s.name for s in specs)}\n{result.report}")
    return result


def run_all(args: argparse.Namespace, domains: dict[str, DomainSpec], acc) -> list[dict]:
    """Every method for every seed (the adapters for every order too): one record per run."""
    weights = args.data_root / "resnet_cifar10" / "resnet56.safetensors"
    runs = []
    for seed in args.seeds:
        seeded = {n: replace(d, config=replace(d.config, seed=seed)) for n, d in domains.items()}
        for k, order in enumerate(orders(args.orders)):
            specs = [seeded[n] for n in order]
            for topology in ("parallel", "series"):
                if topology in args.methods:
                    start = time.perf_counter()
                    result = run_adapters(topology, specs, weights, acc)
                    runs.append(record(result, seed, k, time.perf_counter() - start))
                    save_runs(args, runs)
        specs = [seeded[n] for n in ORDER]
        for method in ("fine-tuning", "linear probe"):
            if method in args.methods:
                start = time.perf_counter()
                result = run_baseline(method, args, specs, weights, acc)
                runs.append(record(result, seed, None, time.perf_counter() - start))
                save_runs(args, runs)
    return runs


def run_baseline(method: str, args: argparse.Namespace, specs: list[DomainSpec], weights: Path, acc):
    """Fine-tuning (the head at `--finetune-lr`, the backbone 10x slower) or the linear probe."""
    if method == "linear probe":
        return linear_probe_baseline("cifar_resnet56", specs, pretrained=weights, accelerator=acc)
    overrides = {"lr": args.finetune_lr, "weight_decay": 0.0005}  # the backbone at 0.5x (the default)
    return finetune_baseline(
        "cifar_resnet56", specs, pretrained=weights, overrides=overrides, accelerator=acc
    )


def save_runs(args: argparse.Namespace, runs: list[dict]) -> None:
    """The runs so far to `--json` (a long run interrupted keeps what it finished)."""
    if args.json:
        args_out = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": args_out, "runs": runs}, indent=1))


def record(result: SequenceResult, seed: int, order: int | None, seconds: float) -> dict:
    return {
        "method": result.method,
        "seed": seed,
        "order": order,
        "seconds": seconds,
        "accuracies": result.accuracies,
        "acc": float(result.report.acc),
        "bwt": float(result.report.bwt),
        "forgetting": float(result.report.forgetting),
        "parameters": result.total_parameters(),
        "unchanged": result.unchanged,
        "matrix": result.report.matrix.tolist(),
        "names": list(result.report.names),
        "errors": result.errors(),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], floor: float) -> dict[str, dict]:
    """Per method: mean ± std over its runs of every domain's accuracy, ACC and Decathlon score (each
    run scored against the fine-tuning errors of its seed; 250 per domain at par)."""
    from adapterkit.metrics import decathlon_score

    base = {r["seed"]: r["errors"] for r in runs if r["method"] == "fine-tuning"}
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {name: mean_std([r["accuracies"][name] for r in mine]) for name in ORDER}
        row["ACC"] = mean_std([r["acc"] for r in mine])
        if base:
            floored = {s: {n: max(e, floor) for n, e in errs.items()} for s, errs in base.items()}
            scores = [
                decathlon_score(r["errors"], floored[r["seed"]])[0] for r in mine if r["seed"] in floored
            ]
            row["Decathlon"] = mean_std(scores) if scores else (float("nan"), 0.0)
        row["#par"] = (statistics.fmean(r["parameters"] for r in mine), 0.0)
        row["runs"] = (len(mine), 0.0)
        summary[method] = row
    return summary


def checks(runs: list[dict], summary: dict[str, dict]) -> list[tuple[str, bool]]:
    """The paper's orderings on the mean ACC, the no-forgetting invariant and order independence."""
    found = []
    for a, b, op in ORDERINGS:
        if a in summary and b in summary:
            x, y = summary[a]["ACC"][0], summary[b]["ACC"][0]
            found.append((f"{a} {op} {b} ({x:.4f} vs {y:.4f})", x >= y if op == ">=" else x > y))
    adapters = [r for r in runs if r["order"] is not None]
    if adapters:
        exact = all(all(r["unchanged"].values()) and r["bwt"] == 0 == r["forgetting"] for r in adapters)
        found.append(("no forgetting: probe logits bit-identical, BWT = forgetting = 0", exact))
        same = all(
            r["accuracies"] == q["accuracies"]
            for r in adapters
            for q in adapters
            if (r["method"], r["seed"]) == (q["method"], q["seed"])
        )
        if len({r["order"] for r in adapters}) > 1:  # (one order: nothing to compare)
            found.append(("adapters: every domain's accuracy identical in every order", same))
    return found


def report(runs: list[dict], summary: dict[str, dict], args: argparse.Namespace) -> list[tuple[str, bool]]:
    cells = lambda m, s, d, n: f"{m:.{d}f}" + (f" ± {s:.{d}f}" if n > 1 else "")  # noqa: E731  (no std of 1 run)
    columns = [*ORDER, "ACC", "Decathlon"]
    rows = [
        [
            method,
            *(
                cells(*row[c], 1 if c == "Decathlon" else 4, row["runs"][0]) if c in row else "-"
                for c in columns
            ),
            f"{row['#par'][0]:.3f}x",
            row["runs"][0],
        ]
        for method, row in summary.items()
    ]
    print(f"\n== mean ± std over seeds {args.seeds} x {args.orders} order(s) (baselines: over seeds)")
    print(format_table(rows, ["method", *columns, "#par", "runs"]))
    found = checks(runs, summary)
    print("\n== checks\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in found))
    return found


def plots(folder: Path, runs: list[dict], summary: dict[str, dict]) -> None:
    """The first parallel run's accuracy matrix as a heatmap; per-domain bars per method (± std)."""
    from adapterkit.plots import accuracy_heatmap, domain_bars

    folder.mkdir(parents=True, exist_ok=True)
    first = next((r for r in runs if r["order"] is not None), None)
    if first is not None:
        title = f"{first['method']} adapters: accuracy on j after training i"
        print(
            "wrote", accuracy_heatmap(first["matrix"], first["names"], folder / "accuracy_matrix.png", title)
        )
    means = {m: {n: row[n][0] for n in ORDER} for m, row in summary.items()}
    stds = {m: {n: row[n][1] for n in ORDER} | {"mean": row["ACC"][1]} for m, row in summary.items()}
    print("wrote", domain_bars(means, folder / "domain_accuracy.png", stds, title="test accuracy per domain"))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("adapterkit.continual").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data_root / "resnet_cifar10" / "resnet56.safetensors").is_file():
        raise SystemExit(
            f"No ResNet-56 weights under {args.data_root}: pass --data-root pointing at the shared data."
        )
    if args.plots:  # fail now, not after the run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plots needs matplotlib: pip install 'adapterkit[plot]'") from None
    start = time.perf_counter()
    domains = load_domains(args)
    acc = make_accelerator(domains[ORDER[0]].config)
    runs = run_all(args, domains, acc)
    # a perfect baseline has error 0, where the Decathlon score is undefined: floor it at half an image
    summary = summarise(runs, 0.5 / min(len(d.test) for d in domains.values()))
    found = report(runs, summary, args)
    if args.plots:
        plots(args.plots, runs, summary)
    total = time.perf_counter() - start
    print(
        f"\ntotal {total:.0f} s; per run: " + ", ".join(f"{r['method']} {r['seconds']:.0f} s" for r in runs)
    )
    if args.json:
        args_out = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        out = {"args": args_out, "seconds": total, "runs": runs, "summary": summary, "checks": found}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
