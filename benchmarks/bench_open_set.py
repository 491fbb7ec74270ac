"""Unknown-domain detection (issue 16.3): the signature score, the routed domain's head, and the open score.

For a family trained by `bench_router_e2e.py --family DIR` (the five real domains), each domain in turn
(and CIFAR-10, a domain no family member saw) is held out: the signatures of the other four route the test
images of all, and each image is scored by

- `best`: the best signature score; `margin`: best minus the chosen domain's threshold (the decision
  before the forward, `route(x)`);
- `energy`: the logsumexp of the chosen domain's logits (the classifier's confidence);
- `open score` (shipped: `route(x, classify=True)`, the service) and `open margin` (minus the domain's
  `open_threshold`), from the calibration each signature holds (`--refit-signatures` fits it);
- `log p_sig`, `combined λ` (best + λ log(p_energy + 0.001)) and `grid a b` (best + a log p_sig + b log
  p_energy, on each half of every test set): the statistics the open score was chosen from, each p the
  share of the chosen domain's own `--calibration` training images (routed to it) at or below the image.

It reports the AUROC of known (the other four domains' test images) vs held-out images for each score, the
share flagged unknown at the thresholds, and (`calibration`) each domain's own test images flagged with the
open-set calibration from its training images vs from held-out images.

    python benchmarks/bench_router_e2e.py --image-size 64 --family /tmp/fam64   # trains the family
    python benchmarks/bench_open_set.py --family /tmp/fam64 --image-size 64 --refit-signatures \
        --cache /tmp/os64.safetensors --out benchmarks/results/open_set_64px.json
"""

from __future__ import annotations

import argparse
import sys
import time
from copy import deepcopy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from _common import write_report  # noqa: E402
from bench_router import ORDERS, auroc, tensors  # noqa: E402
from bench_router_e2e import refit_signatures  # noqa: E402
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterModel  # noqa: E402
from adapterkit.router import open_decisions  # noqa: E402
from adapterkit.signature import COMPONENTS, REJECT, open_scores  # noqa: E402

DOMAINS_ = ORDERS[0]
FLOOR = 1e-3  # log(p + FLOOR): a value below every calibration image's counts as p = 0
GRID = [
    (a, b) for a in (0.0, 0.05, 0.1, 0.2, 0.5) for b in (0.0, 0.1, 0.2, 0.5)
]  # best + a log p_sig + b log p_e


@torch.no_grad()
def collect(model: AdapterModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signature scores (columns in DOMAINS_ order) and every domain's head energy, per image."""
    scores, energy = [], []
    for b in x.split(250):
        routed = model.route(b)
        scores.append(routed.scores[:, [routed.names.index(d) for d in DOMAINS_]])
        energy.append(torch.stack([model(b, domain=d).float().logsumexp(dim=1) for d in DOMAINS_], dim=1))
    return {"scores": torch.cat(scores), "energy": torch.cat(energy)}


def held_out(model: AdapterModel, sets: dict, held: str, lambdas: list[float]) -> dict:
    """AUROC of known (the other domains' test images) vs `held`'s test images for each score; and for
    `best + a log p_sig + b log p_energy` over GRID, each test set split in halves (even and odd images):
    the AUROC on each half, so a weight chosen on one half can be judged on the other."""
    known = [d for d in DOMAINS_ if d != held]
    cols = [DOMAINS_.index(d) for d in known]
    thresholds = torch.stack([model.signatures[d].threshold for d in known])

    def routed(entry: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        best, arg = entry["scores"][:, cols].max(dim=1)
        energy = entry["energy"][:, cols].gather(1, arg[:, None])[:, 0]
        return best, arg, energy

    calibration = []  # per known domain, its own images routed to it: sorted scores and energies
    for j, d in enumerate(known):
        best, arg, energy = routed(sets[f"{d}|train"])
        calibration.append((best[arg == j].sort().values, energy[arg == j].sort().values))

    def scores(name: str) -> dict[str, torch.Tensor]:
        best, arg, energy = routed(sets[f"{name}|test"])
        p_sig, p = torch.zeros_like(best), torch.zeros_like(energy)
        for j, (cal_sig, cal) in enumerate(calibration):  # share of calibration values <= the image's
            mine = arg == j
            p_sig[mine] = torch.searchsorted(cal_sig, best[mine], right=True) / len(cal_sig)
            p[mine] = torch.searchsorted(cal, energy[mine], right=True) / len(cal)
        log_sig, log_e = (p_sig + FLOOR).log(), (p + FLOOR).log()
        out = {"best": best, "margin": best - thresholds[arg], "energy": energy, "log p_sig": log_sig}
        chosen = [model.signatures[known[j]] for j in arg.tolist()]
        if all(s.open_threshold is not None for s in chosen):  # the shipped open score and its decision
            shipped = open_scores(best, energy, chosen)
            out["open score"] = shipped
            out["open margin"] = shipped - torch.stack([s.open_threshold for s in chosen])
        out |= {f"combined {lam}": best + lam * log_e for lam in lambdas}
        out |= {f"grid {a} {b}": best + a * log_sig + b * log_e for a, b in GRID}
        return out

    inside = [scores(d) for d in known]
    outside = scores(held)

    def area(key: str, half: slice) -> float:
        return auroc(torch.cat([s[key][half] for s in inside]), outside[key][half])

    every = slice(None)
    flagged = {}
    for key in ("margin", "open margin"):
        if key in outside:
            flagged[key] = {
                "held out": float((outside[key] < 0).double().mean()),
                "known": float((torch.cat([s[key] for s in inside]) < 0).double().mean()),
            }
    return {"flagged unknown": flagged} | {
        k: area(k, every) if not k.startswith("grid") else [area(k, slice(h, None, 2)) for h in (0, 1)]
        for k in outside
    }


def choose(results: dict) -> dict:
    """The GRID weights with the highest lowest AUROC over the held-out sets on one half, and what they
    give on the other half."""
    out = {}
    for fit, judge in ((0, 1), (1, 0)):
        lowest = {
            k: min(r[k][fit] for r in results.values()) for k in results["cifar10"] if k.startswith("grid")
        }
        key = max(lowest, key=lowest.get)
        out[f"chosen on half {fit}"] = {
            "weights": key,
            "lowest, chosen half": lowest[key],
            "lowest, other half": min(r[key][judge] for r in results.values()),
            "other half": {h: r[key][judge] for h, r in results.items()},
        }
    return out


def refit(args: argparse.Namespace) -> None:
    """Refit every domain's signature from its training images as bench_router_e2e.py fits them (same
    images, same order, so the same mixtures), now with the domain's head energies."""
    before = AdapterModel.from_pretrained(args.family)
    e2e = argparse.Namespace(
        data_root=args.data_root, train_limit=4096, omniglot_classes=100, signature_budget=0.01,
        components=COMPONENTS, maps=0,
    )  # fmt: skip
    refit_signatures(e2e, args.family)
    after = AdapterModel.from_pretrained(args.family)
    for d in DOMAINS_:  # the scores of a cache collected before stay valid only if the mixtures did
        old, new = before.signatures[d].state_dict(), after.signatures[d].state_dict()
        same = all(torch.equal(t, new[k]) for k, t in old.items())
        print(f"{d}: mixture {'unchanged' if same else 'CHANGED: recollect the cache'}", flush=True)


def held_out_calibration(model: AdapterModel, sets: dict) -> dict:
    """Each domain's own test images flagged unknown (their odd half; every domain known) with the open-set
    calibration its signature holds (from its training images, which its head was trained on) and with
    one from the even half of its test images, as `fit_signature(..., calibration=)` makes it from a
    validation split; and the open score's AUROC against each held-out set on its odd half with both."""
    signatures = {d: model.signatures[d] for d in DOMAINS_}
    recalibrated = {}
    for j, d in enumerate(DOMAINS_):
        entry = sets[f"{d}|test"]
        copy = deepcopy(signatures[d])
        even_scores, even_energy = entry["scores"][0::2, j], entry["energy"][0::2, j]
        copy._calibrate_open(even_scores, even_energy, even_energy, REJECT)  # what calibration= computes
        recalibrated[d] = copy
    out = {}
    for label, table in (("training images", signatures), ("held-out images", recalibrated)):
        flagged = {}
        for j, d in enumerate(DOMAINS_):
            entry = sets[f"{d}|test"]
            best, energy = entry["scores"][1::2, j], entry["energy"][1::2, j]
            logits = energy[:, None]  # one column: its logsumexp is the energy
            known = open_decisions(best, logits, [table[d]] * len(best))[0]
            flagged[d] = sum(k is False for k in known) / len(known)
        out[label] = {"own test images flagged (odd half)": flagged}
    return out


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
    p.add_argument("--cache", type=Path, help="safetensors file of the collected scores (read if present)")
    p.add_argument(
        "--refit-signatures",
        action="store_true",
        help="first refit the family's signatures in place with this version (open-set calibration included)",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.refit_signatures:
        refit(args)
    model = AdapterModel.from_pretrained(args.family).eval()
    sets = {}
    if args.cache and args.cache.is_file():
        flat = load_file(args.cache)
        sets = {k.rsplit("|", 1)[0]: {} for k in flat}
        for k, t in flat.items():
            sets[k.rsplit("|", 1)[0]][k.rsplit("|", 1)[1]] = t
    for name in DOMAINS_ + ["cifar10"] if not sets else []:
        for split, limit, seed in (("test", args.test_limit, 0), ("train", args.calibration, 1)):
            if name == "cifar10" and split == "train":
                continue
            kw = {"num_classes": 100} if name == "omniglot" else {}
            data = DOMAINS[name](args.data_root, split, **kw)
            sets[f"{name}|{split}"] = collect(model, tensors(model, data, limit, args.image_size, seed))
    if args.cache and not args.cache.is_file():
        save_file({f"{k}|{n}": t.contiguous() for k, v in sets.items() for n, t in v.items()}, args.cache)
    results = {held: held_out(model, sets, held, args.lambdas) for held in DOMAINS_ + ["cifar10"]}
    calibration = held_out_calibration(model, sets)
    for label, c in calibration.items():
        flagged = c["own test images flagged (odd half)"]
        print(f"calibrated on {label}: own test images flagged", {d: round(v, 4) for d, v in flagged.items()})
    for key in (k for k in results["cifar10"] if not k.startswith(("grid", "flagged"))):
        row = [results[h][key] for h in results]
        print(f"{key:14s}", " ".join(f"{v:.3f}" for v in row), f"min {min(row):.3f}")
    chosen = choose(results)
    for name, c in chosen.items():
        print(
            name,
            c["weights"],
            f"lowest {c['lowest, chosen half']:.3f} -> other half {c['lowest, other half']:.3f}",
        )
    config = vars(args) | {k: str(getattr(args, k)) for k in ("data_root", "out", "family", "cache")}
    write_report(
        args.out, "open_set", config, {"auroc": results, "grid": chosen, "calibration": calibration}, start
    )


if __name__ == "__main__":
    main()
