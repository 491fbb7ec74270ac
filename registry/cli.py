"""`adapterkit-registry`: serve a registry, manage its tokens, check its integrity.

Examples::

    adapterkit-registry token create --root /srv/reg --user alice --scope write
    adapterkit-registry serve --root /srv/reg --port 8000
    HF_ENDPOINT=http://127.0.0.1:8000 HF_TOKEN=akr_... hf upload alice/my-family ./family
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .auth import SCOPES, TokenStore
from .context import MB
from .errors import HubError, RegistryError
from .storage import Storage
from .xet_gc import XORB_GRACE_S


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: pass 0-65535 (0: any free port)")
    return port


ROOT_HELP = "folder holding the registry state"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit-registry", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    common = argparse.ArgumentParser(add_help=False)  # also after the command; SUPPRESS keeps the one before
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve(sub, common)
    _add_token(sub, common)
    _add_maintenance(sub, common)
    return p


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", help="serve the registry over HTTP", parents=[common])
    s.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8000, help="port to bind (default: 8000)")
    s.add_argument(
        "--lfs-threshold-mb",
        type=float,
        default=10,
        help="files above go through Xet or LFS, as the client chooses (default: 10)",
    )
    s.add_argument(
        "--max-upload-mb", type=float, default=1024, help="largest file / commit content (default: 1024)"
    )
    s.add_argument("--public-url", default=None, help="base URL clients use, when behind a reverse proxy")
    s.add_argument(
        "--body-timeout",
        type=float,
        default=60,
        help="seconds a request body may send nothing before the request ends with 408 (default: 60)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="concurrent connections and requests; more are answered 503 (default: 512)",
    )
    s.add_argument(
        "--metrics-token-file",
        type=Path,
        default=None,
        help="file holding a scrape secret GET /metrics then requires as a bearer token (default: open)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _add_token(sub: Any, common: argparse.ArgumentParser) -> None:
    t = sub.add_parser("token", help="create, list or revoke tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="create a token and print it", parents=[common])
    c.add_argument("--root", type=Path, required=True, help=ROOT_HELP + " (created if needed)")
    c.add_argument("--user", required=True, help="user name; the token may write to this namespace")
    c.add_argument(
        "--scope",
        choices=SCOPES,
        default="write",
        help="write (default): push to its namespaces; read: read only",
    )
    c.add_argument(
        "--org", action="append", default=[], help="extra namespace the token may use (repeatable)"
    )
    c.add_argument("--name", default="", help="free-form label")
    ls = tsub.add_parser("list", help="list tokens (ids, users, scopes; never the secrets)", parents=[common])
    ls.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    r = tsub.add_parser("revoke", help="revoke a token by id", parents=[common])
    r.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    r.add_argument("--id", required=True, help="token id as shown by `token list`")


def _add_maintenance(sub: Any, common: argparse.ArgumentParser) -> None:
    f = sub.add_parser(
        "fsck", help="check that every revision is complete and every blob intact", parents=[common]
    )
    f.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    f.add_argument("--quick", action="store_true", help="skip re-hashing blobs")
    f.add_argument(
        "--repair",
        action="store_true",
        help="first put back Xet xorbs an interrupted gc left aside and rebuild Xet index records from the "
        "data they derive from (safe beside a running server)",
    )
    b = sub.add_parser(
        "backup",
        help="copy the root consistently, even while a server runs, and fsck the copy",
        parents=[common],
    )
    b.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    b.add_argument("dest", type=Path, help="new (or empty) folder for the copy, outside the root")
    b.add_argument("--quick", action="store_true", help="fsck the copy by sizes, without re-hashing")
    g = sub.add_parser(
        "gc", help="remove blobs and Xet objects that no revision references", parents=[common]
    )
    g.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    g.add_argument(
        "--grace-s",
        type=float,
        default=3600,
        help="keep unreferenced blobs younger than this (in-flight commits of a running server; default 3600)",
    )
    g.add_argument(
        "--xorb-grace-s",
        type=float,
        default=XORB_GRACE_S,
        help="keep unreferenced Xet xorbs uploaded, named in a dedupe answer or used by a shard less long "
        "ago: clients skip uploading chunks their cache says the server holds (default 3 weeks, hf_xet's "
        "cache lifetime)",
    )
    g.add_argument("--dry-run", action="store_true", help="only count")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .context import RegistryConfig

    _check_port(args.host, args.port)  # before the root is created or anything is printed

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = RegistryConfig(
        root=args.root,
        lfs_threshold_bytes=int(args.lfs_threshold_mb * MB),
        max_upload_bytes=int(args.max_upload_mb * MB),
        public_url=args.public_url,
        body_timeout_s=args.body_timeout,
        metrics_token=_metrics_token(args.metrics_token_file),
    )
    app = create_app(config)
    if not app.state.hub.tokens.list():
        logging.getLogger("adapterkit_registry").warning(
            "no tokens yet: anonymous users can read public repos but nobody can push. Create one with "
            "`adapterkit-registry token create --root %s --user NAME`.",
            args.root,
        )
    if config.metrics_token is None and args.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("adapterkit_registry").warning(
            "/metrics is open to anyone who reaches %s (request counts and latencies, no repo names); "
            "protect it with --metrics-token-file or at the reverse proxy.",
            args.host,
        )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=30,
        limit_concurrency=args.max_connections,
    )
    return 0


def _metrics_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --metrics-token-file {path} ({e}); pass a readable file") from e
    if len(token) < 16:
        raise ValueError(
            f"--metrics-token-file {path} holds fewer than 16 characters; write a secret into it "
            "(`openssl rand -hex 32 > FILE`)"
        )
    return token


def _check_port(host: str, port: int) -> None:
    import socket

    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as e:
        raise OSError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port or stop what holds it"
        ) from e


def _token(args: argparse.Namespace) -> int:
    # `token create` is the first step on a new root; list/revoke on a mistyped --root must not
    # look like an empty token list.
    Storage(args.root, create=args.token_command == "create")
    store = TokenStore(args.root)
    if args.token_command == "create":
        print(store.create(args.user, args.scope, args.name, tuple(args.org)))
    elif args.token_command == "list":
        for t in store.list():
            orgs = f" orgs={','.join(t['orgs'])}" if t.get("orgs") else ""
            print(f"{t['id']}  {t['user']:<16} {t['scope']:<5} {t['created']}  {t['name']}{orgs}")
    elif not store.revoke(args.id):
        print(f"error: no token with id {args.id!r}; see `adapterkit-registry token list`.", file=sys.stderr)
        return 2
    else:
        print(f"revoked token {args.id}")
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from .collect import collect_garbage
    from .fsck import fsck, repair, xet_pending

    storage = Storage(args.root, create=False)
    for line in repair(storage) if args.repair else ():
        print(f"repaired: {line}")
    problems = fsck(storage, deep=not args.quick)
    for line in problems:
        print(line)
    for line in xet_pending(storage):  # not a problem: the server applies them
        print(line)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    garbage = collect_garbage(storage, dry_run=True)
    if garbage.unreferenced:  # not a problem: left by rejected commits, deleted repos, overwritten files
        print(
            f"{garbage.unreferenced} unreferenced blob(s); remove them with `adapterkit-registry gc --root {args.root}`"
        )
    if garbage.xet.files or garbage.xet.xorbs:
        print(
            f"xet: {garbage.xet.files} unreferenced file record(s) and {garbage.xet.xorbs} xorb(s) old enough "
            "to collect; `adapterkit-registry gc` removes them"
        )
    return 1 if problems else 0


def _backup(args: argparse.Namespace) -> int:
    from .backup import backup

    report = backup(Storage(args.root, create=False), args.dest, deep=not args.quick)
    for line in report.problems:
        print(line)
    if report.problems:
        print(
            f"error: the copy failed fsck ({len(report.problems)} problem(s)); nothing was kept at {args.dest}"
        )
        return 1
    print(
        f"backed up {report.repos} repo(s), {report.files} file(s), {report.bytes} bytes to {args.dest}; fsck ok"
    )
    return 0


def _gc(args: argparse.Namespace) -> int:
    from .collect import collect_garbage

    report = collect_garbage(Storage(args.root, create=False), args.grace_s, args.dry_run, args.xorb_grace_s)
    verb = "would remove" if args.dry_run else "removed"
    kept = report.unreferenced - report.removed
    print(f"{report.unreferenced} unreferenced blob(s); {verb} {report.removed} ({report.freed_bytes} bytes)")
    if kept and not args.dry_run:
        print(f"kept {kept} younger than --grace-s {args.grace_s:g}")
    x = report.xet
    if x.files or x.xorbs or x.kept_recent:
        done = f"{x.files} file record(s), {x.xorbs} xorb(s)"
        if not args.dry_run:  # candidates touched since the scan stay (counted as recent)
            done = f"{x.removed_files} file record(s), {x.removed_xorbs} xorb(s), {x.removed_shards} shard record(s) ({x.freed_bytes} bytes)"
        print(f"xet: {verb} {done}; kept {x.kept_recent} unreferenced but recent (--grace-s, --xorb-grace-s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapterkit-registry` command.

    Refusals (bad root, root already served, bad token arguments) print one line naming the problem
    and the fix, and exit with status 2; `--verbose` shows the traceback instead.
    """
    args = _parser().parse_args(argv)
    commands = {"serve": _serve, "token": _token, "fsck": _fsck, "backup": _backup, "gc": _gc}
    try:
        return commands[args.command](args)
    except (RegistryError, HubError, ValueError, OSError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
