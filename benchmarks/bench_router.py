"""Routing images without a domain on the real sequence: accuracy, open-set AUROC and cost.

Backbone: the real CIFAR ResNet-56 at 32 px (`--image-size`). Each of Omniglot, GTSRB, MNIST, DTD-10 and Flowers-90 gets
a signature from up to `--train` of its training images (`AdapterModel.fit_signature`; no adapter
training is needed: signatures read the frozen backbone only). After each domain arrives, in two orders,
the test images of every domain known so far are routed and the earlier signatures are checked
bit-identical. Unknown detection: CIFAR-10 test images (a domain never added) against the five domains'
test images, AUROC of max_d(score_d - threshold_d), and each of the five held out in turn against the
other four. Cost: a batch of 64 with `domain="auto"` vs the
same batch with its true domain given (median of alternating runs, one thread), with 5 and 50 domains,
and `model.route` alone (`route_ratio`). `--maps 2 --components 16`: signatures that read the stem and
the first stage only (a shorter routing pass), with as many components as fit the same byte budget.

    python benchmarks/bench_router.py --out benchmarks/results/router.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from _common import write_report  # noqa: E402
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterModel  # noqa: E402
from adapterkit.data import DomainDataset, open_data  # noqa: E402
from adapterkit.router import feature_maps, route, style_features  # noqa: E402
from adapterkit.signature import COMPONENTS  # noqa: E402
from adapterkit.transforms import Preprocess, resolve_data_config  # noqa: E402

SWEEP_COMPONENTS = 10  # at most, in the budget sweep (the product's default is 6)
ORDERS = (
    ["omniglot", "gtsrb", "mnist", "dtd10", "flowers90"],
    ["flowers90", "mnist", "omniglot", "dtd10", "gtsrb"],
)


def tensors(model: AdapterModel, dataset, limit: int, size: int, seed: int = 0) -> torch.Tensor:
    """A seeded random sample of `limit` images: the datasets are stored sorted by class (GTSRB by
    class and track), so their first images would cover a few classes only."""
    dcfg = resolve_data_config(model.pretrained_cfg, {"input_size": (3, size, size)})
    ds = DomainDataset(open_data(dataset), Preprocess(dcfg))
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.cat([x for x, _ in DataLoader(Subset(ds, pick.tolist()), batch_size=256)])


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """P(score of a known image > score of an unknown one), ties counting one half (Mann-Whitney)."""
    scores = torch.cat([known, unknown]).double()
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for value in scores.unique():  # average ranks of ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    n1, n2 = len(known), len(unknown)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def margin(model: AdapterModel, x: torch.Tensor) -> torch.Tensor:
    routed = model.route(x)
    thresholds = torch.stack([model.signatures[n].threshold for n in routed.names])
    return (routed.scores - thresholds).max(dim=1).values


def held_out(model: AdapterModel, data: dict) -> dict[str, dict[str, float]]:
    """Each domain in turn held out as the unknown one: the AUROC of its test images against the other
    four domains' (signatures of those four only), by the calibrated margin and by the best score, and
    the share of its images flagged unknown."""
    maps = feature_maps(dict(model.signatures))
    features = {d: style_features(model.backbone, data[d][1], maps) for d in ORDERS[0] + ["cifar10"]}
    out = {}
    for held in ORDERS[0] + ["cifar10"]:
        known = {d: model.signatures[d] for d in ORDERS[0] if d != held}
        thresholds = torch.stack([s.threshold for s in known.values()])
        scored = {d: route(features[d], known).scores for d in known | {held: None}}
        margins = {d: (s - thresholds).max(dim=1).values for d, s in scored.items()}
        best = {d: s.max(dim=1).values for d, s in scored.items()}
        out[held] = {
            "auroc_margin": auroc(torch.cat([margins[d] for d in known]), margins[held]),
            "auroc_best_score": auroc(torch.cat([best[d] for d in known]), best[held]),
            "flagged": float((margins[held] < 0).float().mean()),
        }
    return out


def budget_sweep(weights: Path, data: dict, budgets: list[float], maps: int) -> dict[str, dict]:
    """Mean routing of the five domains with signatures fitted at other byte budgets (share of the
    domain's bytes): how many components the budget buys and what they route."""
    model = AdapterModel.from_backbone("cifar_resnet56", pretrained=weights).eval()
    for d in ORDERS[0]:
        model.add_domain(d, num_classes=2)
    out = {}
    for budget in budgets:
        for d in ORDERS[0]:
            model.fit_signature(
                d, data[d][0].split(256), budget=budget, components=SWEEP_COMPONENTS, maps=maps
            )
        routing = {d: sum(b == d for b in model.route(data[d][1]).best) / len(data[d][1]) for d in ORDERS[0]}
        out[str(budget)] = {
            "components": model.signatures["gtsrb"].mean.shape[0],
            "bytes": sum(
                t.numel() * t.element_size() for t in model.signatures["gtsrb"].state_dict().values()
            ),
            "routing": routing,
            "mean_routing": statistics.mean(routing.values()),
        }
        print(f"budget {budget}: {out[str(budget)]}")
    return out


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def cost(model: AdapterModel, x: torch.Tensor, domain: str, repeats: int) -> dict[str, float]:
    known, auto, routing = [], [], []
    with torch.no_grad():
        for _ in range(repeats):  # alternating, so load changes hit all alike
            known += timed(lambda: model(x, domain=domain), 1)
            auto += timed(lambda: model(x, domain="auto"), 1)
            routing += timed(lambda: model.route(x), 1)
    return {
        "known_ms": 1e3 * statistics.median(known),
        "auto_ms": 1e3 * statistics.median(auto),
        "ratio": statistics.median(a / k for a, k in zip(auto, known, strict=True)),
        "route_ratio": statistics.median(r / k for r, k in zip(routing, known, strict=True)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--train", type=int, default=2000, help="training images per signature")
    p.add_argument("--test", type=int, default=1000, help="test images per domain")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--budgets", type=float, nargs="*", default=[], help="also fit at these byte budgets")
    p.add_argument("--components", type=int, default=COMPONENTS, help="most mixture components per signature")
    p.add_argument(
        "--maps", type=int, default=0, help="feature maps signatures read (0: all stages' but the last)"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "router.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    weights = args.data_root / "resnet_cifar10" / "resnet56.safetensors"
    base = AdapterModel.from_backbone("cifar_resnet56", pretrained=weights).eval()
    data = {
        d: (
            tensors(base, DOMAINS[d](args.data_root, "train"), args.train, args.image_size),
            tensors(base, DOMAINS[d](args.data_root, "test"), args.test, args.image_size),
        )
        for d in ORDERS[0] + ["cifar10"]
    }
    results: dict[str, object] = {"orders": []}
    for order in ORDERS:
        model = AdapterModel.from_backbone("cifar_resnet56", pretrained=weights).eval()
        steps = []
        for name in order:
            model.add_domain(name, num_classes=2)
            frozen = {
                d: {k: v.clone() for k, v in model.signatures[d].state_dict().items()}
                for d in model.signatures
            }
            model.fit_signature(name, data[name][0].split(256), components=args.components, maps=args.maps)
            same = all(
                torch.equal(t, model.signatures[d].state_dict()[k])
                for d, s in frozen.items()
                for k, t in s.items()
            )
            per_domain = {}
            for d in model.domains:
                routed = model.route(data[d][1])
                per_domain[d] = {
                    "routed": sum(b == d for b in routed.best) / len(routed.best),
                    "accepted": sum(r == d for r in routed.domains) / len(routed.domains),
                }
            steps.append(
                {
                    "added": name,
                    "earlier_signatures_identical": same,
                    "routing": per_domain,
                    "mean_routing": statistics.mean(v["routed"] for v in per_domain.values()),
                }
            )
            print(
                f"{'>'.join(order)}: +{name}: mean routing {steps[-1]['mean_routing']:.4f}, earlier identical {same}"
            )
        results["orders"].append({"order": order, "steps": steps})
    known = torch.cat([margin(model, data[d][1]) for d in ORDERS[0]])
    results["auroc_cifar10_unknown"] = auroc(
        known, margin(model, data["cifar10"][1])
    )  # max_d(score_d - threshold_d)
    best = {d: model.route(data[d][1]).scores.max(dim=1).values for d in ORDERS[0] + ["cifar10"]}
    results["auroc_best_score"] = auroc(torch.cat([best[d] for d in ORDERS[0]]), best["cifar10"])
    with torch.no_grad():
        results["held_out"] = held_out(model, data)
    print(results["held_out"])
    results["unknown_flagged"] = sum(r is None for r in model.route(data["cifar10"][1]).domains) / args.test
    x = data["gtsrb"][1][:64]
    results["cost_5_domains"] = cost(model, x, "gtsrb", args.repeats)
    for i in range(45):  # 50 domains: copies of the real signatures under new names
        name = f"copy{i}"
        model.add_domain(name, num_classes=2)
        model.signatures[name] = model.signatures[ORDERS[0][i % 5]]
    results["cost_50_domains"] = cost(model, x, "gtsrb", args.repeats)
    sig = sum(t.numel() * t.element_size() for t in model.signatures["gtsrb"].state_dict().values())
    results["budgets"] = budget_sweep(weights, data, args.budgets, args.maps)
    results["signature_bytes"], results["domain_bytes"] = sig, model.domain_cost("gtsrb")["bytes"]
    print({k: v for k, v in results.items() if k != "orders"})
    write_report(
        args.out,
        "router",
        vars(args) | {"data_root": str(args.data_root), "out": str(args.out)},
        results,
        start,
    )


if __name__ == "__main__":
    main()
