"""`adapterkit push / pull / list / info`: the Hub (or our registry, via HF_ENDPOINT) from the shell.

    adapterkit push FAMILY REPO_ID [--domain NAME ...] [--private] [--branch B] [--message M]
    adapterkit pull REPO_ID FAMILY [--domain NAME ...] [--revision R]
    adapterkit list [--backbone NAME] [--domain NAME] [--author USER] [--search TEXT]
    adapterkit info REPO_ID_OR_FAMILY [--revision R]

`pull` copies files only (no backbone is built): the folder it writes is a family that `from_pretrained`,
`adapterkit eval` and `adapterkit export` read. All commands take `--token` (default: the Hub's usual
token resolution, e.g. `HF_TOKEN`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import _backbone_arguments, _load, register


def _token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("family", help="family folder")
    p.add_argument("repo_id", help="Hub repo, e.g. alice/decathlon-r56")
    p.add_argument("--domain", action="append", help="push only this domain (repeatable; default: all)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--branch", default=None)
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--force", action="store_true", help="replace a remote family built on other weights")
    _backbone_arguments(p)
    _token(p)


def run_push(args: argparse.Namespace) -> int:
    model = _load(args, args.domain)
    url = model.push_to_hub(
        args.repo_id,
        domains=args.domain,
        private=args.private or None,
        branch=args.branch,
        commit_message=args.message,
        token=args.token,
        force=args.force,
    )
    print(f"pushed {', '.join(model.domains)} to {args.repo_id}: {url}")
    return 0


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id")
    p.add_argument("family", help="folder to write the family into")
    p.add_argument("--domain", action="append", help="pull only this domain (repeatable; default: all)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    _token(p)


def run_pull(args: argparse.Namespace) -> int:
    from .family import BASIS_FILE, CONFIG_FILE, atomic_write, domain_file
    from .hub import hub_fetch
    from .load import read_config

    fetch = hub_fetch(args.repo_id, revision=args.revision, token=args.token)
    config = read_config(fetch)
    names = args.domain or list(config["domains"])
    missing = [n for n in names if n not in config["domains"]]
    if missing:
        raise KeyError(f"{args.repo_id} has no domains {missing} (it has: {', '.join(config['domains'])})")
    out = Path(args.family)
    files = [domain_file(n) for n in names] + ([BASIS_FILE] if config.get("basis") else []) + ["README.md"]
    for path in files:
        atomic_write(out / path, fetch(path).read_bytes())
    config["domains"] = {n: config["domains"][n] for n in names}
    atomic_write(out / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    print(f"pulled {', '.join(names)} from {args.repo_id} into {out}")
    return 0


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="families built on this backbone (timm or hf-hub: name)")
    p.add_argument("--domain", default=None, help="families that have this domain")
    p.add_argument("--author", default=None)
    p.add_argument("--search", default=None)
    _token(p)


def run_list(args: argparse.Namespace) -> int:
    from .hub import list_families

    families = list_families(
        args.backbone, domain=args.domain, author=args.author, search=args.search, token=args.token
    )
    print("| family | backbone | domains |")
    print("|---|---|---|")
    for m in families:
        card = m.card_data or {}
        domains = [t.removeprefix("domain:") for t in (m.tags or []) if t.startswith("domain:")]
        print(f"| {m.id} | {card.get('base_model', '')} | {', '.join(domains)} |")
    print(f"{len(families)} famil{'y' if len(families) == 1 else 'ies'}")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hub repo id or family folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--json", action="store_true", help="print adapterkit.json as it is")
    _token(p)


def run_info(args: argparse.Namespace) -> int:
    from .load import read_config, source_fetch

    kwargs = {"revision": args.revision, "token": args.token} if not Path(args.source).is_dir() else {}
    config = read_config(source_fetch(args.source, **kwargs))
    if args.json:
        print(json.dumps(config, indent=2, sort_keys=True))
        return 0
    backbone, rules = config["backbone"], config["adapter_config"]
    print(f"backbone: {backbone['name']} ({backbone['fingerprint'][:23]}...)")
    print(
        f"adapters: {rules['topology']}, placement {rules['placement']}, rank {rules['rank']}, "
        f"{len(config['layers'])} adapted layers"
    )
    if config.get("basis"):
        print(
            f"shared basis: {sum(config['basis']['ranks'].values())} columns over {len(config['basis']['ranks'])} layers"
        )
    metrics = sorted({k for e in config["domains"].values() for k in (e.get("metrics") or {})})
    print("\n| domain | classes | parameters | bytes | " + " | ".join(metrics) + " |")
    print("|---|---|---|---|" + "---|" * len(metrics))
    for name, e in config["domains"].items():
        cells = " | ".join(f"{e['metrics'][k]:.4g}" if k in (e.get("metrics") or {}) else "" for k in metrics)
        print(f"| {name} | {e['num_classes']} | {e['parameters']:,} | {e['bytes']:,} | {cells} |")
    return 0


register("push", "push a family folder's domains to a Hub repo", add_push_arguments, run_push)
register("pull", "download domains of a Hub family into a folder", add_pull_arguments, run_pull)
register("list", "list adapterkit families on the Hub (by backbone or domain)", add_list_arguments, run_list)
register("info", "describe a family (Hub repo or folder)", add_info_arguments, run_info)
