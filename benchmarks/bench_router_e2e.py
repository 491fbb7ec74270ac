"""End-to-end accuracy without a domain (issue 16.4): `domain="auto"` against the true domain.

Backbone: the real CIFAR ResNet-56 at 32 px. Each of Omniglot (first 100 characters), GTSRB, MNIST,
DTD-10 and Flowers-90 is trained ONCE with parallel adapters (`train_domain`, which also records the
domain's signature from its training images) and the family is saved. A full per-domain adapter's
training reads the frozen backbone and its own data only, so it does not depend on the order: each
order then rebuilds the family by arrival (`from_pretrained` with the first domain, `load_domain` for
each next one) and, after each arrival, classifies the test images of every domain known so far
twice: with the true domain, and routed (`model.route(x, classify=True)`: each image through its best
domain in one mixed batch, as `model(x, domain="auto")` does, then the unknown decision the service makes).
A routed image counts as right only if it was routed to its own domain (an image routed to another domain
or called unknown is wrong) and the class is right; `auto_best` ignores the unknown decision (what
`domain="auto"` itself does).

    python benchmarks/bench_router_e2e.py --out benchmarks/results/router_e2e.json
    python benchmarks/bench_router_e2e.py --family /tmp/fam   # keep the trained family there; run again
        with --family /tmp/fam --refit-signatures: the same adapters, signatures fitted by this version
        (`--maps 2 --components 16`: signatures that read the stem and first stage only)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from _common import write_report  # noqa: E402
from bench_router import ORDERS  # noqa: E402  (the same two domain orders)
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterModel  # noqa: E402
from adapterkit.data import DomainDataset, open_data  # noqa: E402
from adapterkit.family import save_family  # noqa: E402
from adapterkit.metrics import decathlon_score  # noqa: E402
from adapterkit.signature import COMPONENTS  # noqa: E402
from adapterkit.train import TrainConfig, train_domain  # noqa: E402
from adapterkit.transforms import Preprocess, resolve_data_config  # noqa: E402

NO_FLIP = {"omniglot", "gtsrb", "mnist"}  # glyphs, signs and digits change meaning when mirrored
BATCH = 250


def load(args: argparse.Namespace, name: str, split: str):
    kw = {"num_classes": args.omniglot_classes} if name == "omniglot" else {}
    limit = args.train_limit if split == "train" else args.test_limit
    return DOMAINS[name](args.data_root, split, limit=limit, **kw)


def test_tensors(model: AdapterModel, name: str, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The domain's test images with its own eval preprocessing (its recorded data config)."""
    dcfg = resolve_data_config(model.pretrained_cfg, model.domain_info(name).data_config)
    ds = DomainDataset(open_data(dataset), Preprocess(dcfg))
    xs, ys = zip(*DataLoader(ds, batch_size=BATCH), strict=True)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def classify(model: AdapterModel, x: torch.Tensor, name: str, auto: bool) -> dict[str, torch.Tensor]:
    """Predicted classes with the true domain, or routed: chosen domains (None: unknown) and classes."""
    if not auto:
        return {"pred": torch.cat([model(b, domain=name).argmax(1) for b in x.split(BATCH)])}
    preds, chosen, best = [], [], []
    for b in x.split(BATCH):
        routed = model.route(b, classify=True)  # the decision after the forward, as the service makes it
        preds.append(routed.logits.argmax(1))  # what domain="auto" runs
        chosen += routed.domains
        best += routed.best
    return {"pred": torch.cat(preds), "chosen": chosen, "best": best}


def evaluate(model: AdapterModel, tests: dict, name: str) -> dict[str, float]:
    x, y = tests[name]
    true = classify(model, x, name, auto=False)["pred"] == y
    routed = classify(model, x, name, auto=True)
    right_class = routed["pred"] == y
    accepted = torch.tensor([c == name for c in routed["chosen"]])
    best = torch.tensor([b == name for b in routed["best"]])
    out = {
        "true_domain": true.float().mean().item(),
        "auto": (right_class & accepted).float().mean().item(),
        "auto_best": (right_class & best).float().mean().item(),
        "routed_right": best.float().mean().item(),
        "flagged_unknown": sum(c is None for c in routed["chosen"]) / len(y),
    }
    out["difference_points"] = 100 * (out["true_domain"] - out["auto"])
    return out


def train_all(args: argparse.Namespace, weights: Path, family: Path) -> dict[str, dict]:
    model = AdapterModel.from_backbone("cifar_resnet56", pretrained=weights)
    trained = {}
    for name in ORDERS[0]:
        start = time.perf_counter()
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            flip=name not in NO_FLIP,
            threads=1,
            progress=False,
            eval_batch_size=BATCH,
        )
        data_config = {"input_size": args.image_size}
        train_domain(model, name, load(args, name, "train"), config=config, data_config=data_config)
        fit_signature(args, model, name)
        trained[name] = {"train_s": time.perf_counter() - start}
        print(f"trained {name} in {trained[name]['train_s']:.0f} s", flush=True)
    save_family(model, family)
    return trained


def refit_signatures(args: argparse.Namespace, family: Path) -> None:
    """Refit every domain's signature from its training images (as `train_domain` does) and save."""
    model = AdapterModel.from_pretrained(family)
    for name in ORDERS[0]:
        fit_signature(args, model, name)
    save_family(model, family)


def fit_signature(args: argparse.Namespace, model: AdapterModel, name: str) -> None:
    model.fit_signature(
        name,
        signature_batches(args, model, name),
        budget=args.signature_budget,
        components=args.components,
        maps=args.maps,
    )


def signature_batches(args: argparse.Namespace, model: AdapterModel, name: str):
    """The domain's training images with its eval preprocessing, in a fixed order."""
    dcfg = resolve_data_config(model.pretrained_cfg, model.domain_info(name).data_config)
    ds = DomainDataset(open_data(load(args, name, "train")), Preprocess(dcfg))
    return (x for x, _ in DataLoader(ds, batch_size=BATCH))


def run_order(order: list[str], family: Path, tests: dict, reference: dict) -> list[dict]:
    model = AdapterModel.from_pretrained(family, domains=[order[0]]).eval()
    steps = []
    for i, name in enumerate(order):
        if i:
            model.load_domain(family, name)
        per_domain = {d: evaluate(model, tests, d) for d in order[: i + 1]}
        same = all(per_domain[d]["true_domain"] == reference[d] for d in per_domain)
        step = {
            "added": name,
            "per_domain": per_domain,
            "true_domain_accuracy_unchanged": same,
            **{
                f"mean_{k}": statistics.mean(v[k] for v in per_domain.values())
                for k in ("true_domain", "auto", "auto_best", "routed_right")
            },
        }
        step["mean_difference_points"] = 100 * (step["mean_true_domain"] - step["mean_auto"])
        steps.append(step)
        print(
            f"{'>'.join(order)} +{name}: true {step['mean_true_domain']:.4f} auto {step['mean_auto']:.4f} "
            f"({step['mean_difference_points']:+.2f} pt) routing {step['mean_routed_right']:.4f}",
            flush=True,
        )
    return steps


def decathlon(reference: dict[str, dict]) -> dict[str, float]:
    """Decathlon-style scores of the five domains with the true domain and with `auto`, each domain's
    true-domain error as its baseline (so the true domain scores 250 a domain): the share of the score
    that routing keeps, to set beside the paper's predecessor (Rebuffi et al. 2017: domain prediction
    2,503 against 2,621 with the domain known, 0.955, on the ten Decathlon domains)."""
    base = {d: 1 - v["true_domain"] for d, v in reference.items()}
    true = decathlon_score(base, base)[0]
    auto = decathlon_score({d: 1 - v["auto"] for d, v in reference.items()}, base)[0]
    return {"true_domain": true, "auto": auto, "kept": auto / true, "paper_dom_pred_kept": 2503 / 2621}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per domain")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=4096, help="training images per domain (balanced)")
    p.add_argument("--test-limit", type=int, default=1000, help="test images per domain (balanced)")
    p.add_argument("--omniglot-classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=32, help="input size the domains are trained at")
    p.add_argument(
        "--signature-budget", type=float, default=0.01, help="signature bytes, share of the domain's bytes"
    )
    p.add_argument("--components", type=int, default=COMPONENTS, help="most mixture components per signature")
    p.add_argument(
        "--maps", type=int, default=0, help="feature maps signatures read (0: all stages' but the last)"
    )
    p.add_argument("--family", type=Path, help="keep the trained family here, or reuse the one already there")
    p.add_argument("--refit-signatures", action="store_true", help="refit a reused family's signatures")
    p.add_argument("--out", type=Path, default=HERE / "results" / "router_e2e.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    weights = args.data_root / "resnet_cifar10" / "resnet56.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        family = args.family or Path(tmp) / "family"
        if (family / "adapterkit.json").is_file():
            trained = {"reused": str(family), "signatures_refitted": args.refit_signatures}
            if args.refit_signatures:
                refit_signatures(args, family)
        else:
            trained = train_all(args, weights, family)
        model = AdapterModel.from_pretrained(family).eval()
        tests = {d: test_tensors(model, d, load(args, d, "test")) for d in ORDERS[0]}
        reference = {d: evaluate(model, tests, d) for d in ORDERS[0]}
        with torch.no_grad():  # domain="auto" itself runs the same routes
            x = torch.cat([tests[d][0][:16] for d in ORDERS[0]])
            auto_matches = torch.equal(model(x, domain="auto"), model(x, domain=model.route(x).best))
        results = {
            "trained": trained,
            "full_family": reference,
            "auto_equals_routed_forward": auto_matches,
            "decathlon": decathlon(reference),
            "orders": [
                {
                    "order": o,
                    "steps": run_order(o, family, tests, {d: v["true_domain"] for d, v in reference.items()}),
                }
                for o in ORDERS
            ],
        }
    for d, v in reference.items():
        print(f"{d}: true {v['true_domain']:.4f} auto {v['auto']:.4f} routed {v['routed_right']:.4f}")
    print("decathlon-style score:", results["decathlon"])
    config = vars(args) | {k: str(getattr(args, k)) for k in ("data_root", "out", "family")}
    write_report(args.out, "router_e2e", config, results, start)


if __name__ == "__main__":
    main()
