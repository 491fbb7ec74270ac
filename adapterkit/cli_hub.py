"""`adapterkit push / pull / list / info`: the Hub (or our registry, via HF_ENDPOINT) from the shell.

All four move or read files only (no backbone is built, see `hub.push_folder` / `hub.pull_family`): the
folder `pull` writes is a family that `from_pretrained`, `adapterkit eval` and `adapterkit export` read.
Each command first checks that the endpoint answers (3 s), so a stopped registry or a wrong HF_ENDPOINT
fails at once, and `push` asks the endpoint whose token it has (scope, namespaces) before it reads
anything. All commands take `--token` (default: the Hub's usual resolution, HF_TOKEN or the saved login).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_errors import CliError, check_push_token, endpoint, offline, require_endpoint
from .cli_model import check_domains, plural, require_family
from .cli_output import print_table, status

Token = Annotated[
    str | None,
    typer.Option(help="Hub token \\[default: HF_TOKEN or the saved login]", show_default=False, envvar=None),
]
Revision = Annotated[
    str | None, typer.Option(help="branch, tag or commit \\[default: main]", show_default=False)
]
Domains = Annotated[
    list[str] | None,
    typer.Option(
        "--domain", metavar="NAME", help="only this domain (repeatable) \\[default: all]", show_default=False
    ),
]


def push(
    family: Annotated[Path, typer.Argument(help="family folder")],
    repo_id: Annotated[
        str, typer.Argument(help="Hub repo, e.g. alice/decathlon-r56; a bare name goes to your namespace")
    ],
    domain: Domains = None,
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    branch: Annotated[
        str | None, typer.Option(help="push to this branch \\[default: main]", show_default=False)
    ] = None,
    message: Annotated[str | None, typer.Option(help="commit message", show_default=False)] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace a remote family built on other backbone weights")
    ] = False,
    token: Token = None,
) -> None:
    """Push a family folder's domains to a Hub repo; the domains already there stay.

    Example: adapterkit push fam/ my-family --domain gtsrb
    """
    from .hub import push_folder

    config = require_family(family)
    names = list(domain or config["domains"])
    if not names:  # (it would publish a family without domains, and say "pushed  to ...")
        raise CliError(
            f"{family} has no domains yet, so there is nothing to push: train one first "
            f"(adapterkit train --family {family} --domain NAME --data DIR), then push"
        )
    check_domains(family, config, names)
    require_endpoint()
    check_push_token(repo_id, token)
    result = push_folder(
        family,
        repo_id,
        domains=names,
        private=private or None,
        branch=branch,
        commit_message=message,
        token=token,
        force=force,
    )
    if result.changed:
        print(f"pushed {', '.join(result.domains)} to {result.repo_id}: {result.commit_url}")
    else:
        print(f"nothing to push: {result.repo_id} already holds {', '.join(result.domains)} as they are here")


def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repo, e.g. alice/decathlon-r56 (or @revision)")],
    family: Annotated[Path, typer.Argument(help="folder to write the family into (domains there stay)")],
    domain: Domains = None,
    revision: Revision = None,
    force: Annotated[
        bool, typer.Option("--force", help="write into a folder holding a family on other backbone weights")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="replace domains trained or edited in the folder since it was pulled"
        ),
    ] = False,
    token: Token = None,
) -> None:
    """Download domains of a Hub family into a folder (only their files; no backbone is built). A domain
    the folder already holds is updated when it is the version an earlier pull wrote; one trained or
    edited there since is kept, and the pull refused, unless --overwrite.

    Example: adapterkit pull alice/my-family fam/ --domain gtsrb
    """
    from .hub import pull_family
    from .sources import pin_source

    repo_id, revision = pin_source(repo_id, revision)  # `org/name@rev`, as eval, export and serve take it
    if family.exists() and not family.is_dir():
        raise CliError(f"{family} is a file; pass a folder to write the family into")
    require_endpoint()
    try:
        names = pull_family(
            repo_id, family, domains=domain, revision=revision, token=token, force=force, overwrite=overwrite
        )
    except KeyError as e:  # a domain the family lacks; the message lists the ones it has
        raise CliError(f"{e.args[0] if e.args else e}: pass those with --domain") from e
    print(f"pulled {', '.join(names)} from {repo_id} into {family}")


def list_(
    backbone: Annotated[
        str | None,
        typer.Option(help="families built on this backbone (timm or hf-hub: name)", show_default=False),
    ] = None,
    domain: Annotated[
        str | None, typer.Option(help="families that have this domain", show_default=False)
    ] = None,
    author: Annotated[
        str | None, typer.Option(help="families of this user or organisation", show_default=False)
    ] = None,
    search: Annotated[str | None, typer.Option(help="text in the repo name", show_default=False)] = None,
    token: Token = None,
) -> None:
    """List adapterkit families on the Hub, by backbone, domain or author.

    Example: adapterkit list --backbone resnet50.a1_in1k --domain gtsrb
    """
    if offline():
        raise CliError("list searches the Hub, which HF_HUB_OFFLINE=1 turns off: unset it to list")
    require_endpoint()
    from .hub import list_families

    families = list_families(backbone, domain=domain, author=author, search=search, token=token)
    rows = []
    for m in families:
        tags = m.tags or []
        domains = [t.removeprefix("domain:") for t in tags if t.startswith("domain:")]
        # the backbone tag names every backbone; the card's base_model only Hub-hosted ones
        named = [t.removeprefix("backbone:") for t in tags if t.startswith("backbone:")]
        rows.append(
            [m.id, named[0] if named else (m.card_data or {}).get("base_model") or "", ", ".join(domains)]
        )
    print_table(["family", "backbone", "domains"], rows)
    print(f"{len(rows)} famil{'y' if len(rows) == 1 else 'ies'} on {endpoint()}")


def _weights(backbone: dict[str, Any]) -> str:
    record = backbone.get("weights")
    if not record:
        return "pretrained (not recorded)"
    kind = record.get("kind")
    if kind == "file":
        return f"file {record.get('path')}"
    if kind == "random":
        return f"random (seed {record.get('seed', 0)})"
    return f"{kind} pretrained"


def info(
    source: Annotated[str, typer.Argument(help="Hub repo id (or id@revision) or family folder")],
    revision: Revision = None,
    as_json: Annotated[bool, typer.Option("--json", help="print adapterkit.json as it is")] = False,
    token: Token = None,
) -> None:
    """Describe a family (Hub repo or folder): backbone, adapter rules, basis, domains.

    Example: adapterkit info alice/my-family
    """
    from .format import read_config
    from .sources import check_repo_id, open_source, pin_source

    local = Path(source).is_dir()
    if local:
        require_family(Path(source))
    else:
        source, revision = pin_source(source, revision)  # `org/name@rev`, as eval, export and serve take it
        check_repo_id(source)
        require_endpoint()
    opened = open_source(source, **({} if local else {"revision": revision, "token": token}))
    config = read_config(opened.fetch, opened.files, where=source)
    if as_json:
        print(json.dumps(config, indent=2, sort_keys=True))
        return
    backbone, rules = config["backbone"], config["adapter_config"]
    print(f"backbone: {backbone['name']}, {_weights(backbone)} ({backbone['fingerprint'][:23]}...)")
    print(
        f"adapters: {rules['topology']}, placement {rules['placement']}, rank {rules['rank']}, "
        f"{len(config['layers'])} adapted layers"
    )
    if config.get("basis"):
        ranks = config["basis"]["ranks"]
        print(f"shared basis: {sum(ranks.values())} columns over {plural(len(ranks), 'layer')}")
    domains = config["domains"]
    metrics = sorted({k for e in domains.values() for k in (e.get("metrics") or {})})
    rows = [
        [name, e.get("num_classes"), e.get("parameters"), e.get("bytes")]
        + [(e.get("metrics") or {}).get(k, "") for k in metrics]
        for name, e in domains.items()
    ]
    print_table(["domain", "classes", "parameters", "bytes", *metrics], rows)
    if not rows:
        status(f"{opened.label} has no domains yet")
