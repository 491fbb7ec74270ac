"""Unknown-domain detection with the routed domain's head (issue 16.3, an experiment, not shipped).

The shipped decision calls an image unknown when its best signature score is below that domain's
threshold: it reads the frozen backbone's early features only. This measures whether the routed domain's
own classifier adds to it. For a family trained by `bench_router_e2e.py --family DIR` (the five real
domains), each domain in turn (and CIFAR-10, a domain no family member saw) is held out: the signatures of
the other four route the test images of all, and each image is scored by

- `best`: the best signature score (what the shipped threshold compares);
- `margin`: the best score minus the chosen domain's threshold (the shipped decision);
- `energy`: the logsumexp of the chosen domain's logits (the classifier's confidence);
- `combined λ`: best + λ log(p + 0.001), where p is the share of the chosen domain's own calibration
  images (`--calibration` training images, routed to it) whose energy is at most the image's: each
  domain calibrated on its own images only, so it stays incremental.

It reports the AUROC of known (the other four domains' test images) vs held-out images for each score.

    python benchmarks/bench_router_e2e.py --image-size 64 --family /tmp/fam64   # trains the family
    python benchmarks/bench_open_set.py --family /tmp/fam64 --image-size 64 --out benchmarks/results/open_set_64px.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from _common import write_report  # noqa: E402
from bench_router import ORDERS, auroc, tensors  # noqa: E402
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterModel  # noqa: E402

DOMAINS_ = ORDERS[0]
FLOOR = 1e-3  # log(p + FLOOR): an energy below every calibration image's counts as p = 0


@torch.no_grad()
def collect(model: AdapterModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signature scores (columns in DOMAINS_ order) and every domain's head energy, per image."""
    scores, energy = [], []
    for b in x.split(250):
        routed = model.route(b)
        scores.append(routed.scores[:, [routed.names.index(d) for d in DOMAINS_]])
        energy.append(torch.stack([model(b, domain=d).float().logsumexp(dim=1) for d in DOMAINS_], dim=1))
    return {"scores": torch.cat(scores), "energy": torch.cat(energy)}


def held_out(model: AdapterModel, sets: dict, held: str, lambdas: list[float]) -> dict[str, float]:
    known = [d for d in DOMAINS_ if d != held]
    cols = [DOMAINS_.index(d) for d in known]
    thresholds = torch.stack([model.signatures[d].threshold for d in known])

    def routed(entry: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        best, arg = entry["scores"][:, cols].max(dim=1)
        energy = entry["energy"][:, cols].gather(1, arg[:, None])[:, 0]
        return best, arg, energy

    calibration = []  # per known domain, the sorted energies of its own images routed to it
    for j, d in enumerate(known):
        best, arg, energy = routed(sets[f"{d}|train"])
        calibration.append(energy[arg == j].sort().values)

    def scores(name: str) -> dict[str, torch.Tensor]:
        best, arg, energy = routed(sets[f"{name}|test"])
        p = torch.zeros_like(energy)
        for j, cal in enumerate(calibration):  # share of calibration energies <= the image's
            mine = arg == j
            p[mine] = torch.searchsorted(cal, energy[mine], right=True) / len(cal)
        out = {"best": best, "margin": best - thresholds[arg], "energy": energy}
        return out | {f"combined {lam}": best + lam * (p + FLOOR).log() for lam in lambdas}

    inside = [scores(d) for d in known]
    outside = scores(held)
    return {k: auroc(torch.cat([s[k] for s in inside]), outside[k]) for k in outside}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--family", type=Path, required=True, help="a family saved by bench_router_e2e.py --family"
    )
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--calibration", type=int, default=500, help="training images per domain for p")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    p.add_argument("--out", type=Path, default=HERE / "results" / "open_set.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = AdapterModel.from_pretrained(args.family).eval()
    sets = {}
    for name in DOMAINS_ + ["cifar10"]:
        for split, limit, seed in (("test", args.test_limit, 0), ("train", args.calibration, 1)):
            if name == "cifar10" and split == "train":
                continue
            kw = {"num_classes": 100} if name == "omniglot" else {}
            data = DOMAINS[name](args.data_root, split, **kw)
            sets[f"{name}|{split}"] = collect(model, tensors(model, data, limit, args.image_size, seed))
    results = {held: held_out(model, sets, held, args.lambdas) for held in DOMAINS_ + ["cifar10"]}
    for key in results["cifar10"]:
        row = [results[h][key] for h in results]
        print(f"{key:14s}", " ".join(f"{v:.3f}" for v in row), f"min {min(row):.3f}")
    config = vars(args) | {k: str(getattr(args, k)) for k in ("data_root", "out", "family")}
    write_report(args.out, "open_set", config, {"auroc": results}, start)


if __name__ == "__main__":
    main()
