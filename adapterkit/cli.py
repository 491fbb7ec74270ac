"""The `adapterkit` command line (typer): train, eval, export a family; push, pull, list, info on the Hub.

    adapterkit train  --family DIR --domain NAME --data DIR [--backbone NAME] [options]
    adapterkit eval   --family DIR --data [DOMAIN=]DIR ... [--output R.json] [--plot R.png]
    adapterkit export --family DIR --domain NAME --output DIR
    adapterkit compress --family DIR (--basis-rank K | --energy E) (--output DIR | --dry-run)
    adapterkit append --family DIR --domain NAME [--new-columns N | --energy E]
    adapterkit push FAMILY REPO_ID      adapterkit pull REPO_ID FAMILY
    adapterkit list [--backbone NAME]   adapterkit info REPO_ID_OR_FAMILY
    adapterkit serve SOURCE [--domain NAME ...] [--port N]
    adapterkit predict SOURCE IMAGE... [--domain NAME|auto] [--json]

The commands live in `cli_train.py` (train; `cli_train_flags.py`: its flags checked against the family), `cli_eval.py` (eval), `cli_basis.py` (compress, append: the shared basis), `cli_model.py` (export, and what
every command that runs a model shares), `cli_hub.py` (push, pull, list, info: files and the Hub
only), `cli_serve.py` (serve) and `cli_predict.py` (predict); the `app.command` lines below are the whole command tree. Those
modules import torch, timm and the Hub client inside the command functions, so `--help`, `--version`, `list` and `info` start without loading
a model stack (`cli_output.py`: tables and messages; `cli_errors.py`: what an expected failure says).
Every expected failure prints one line naming the problem and the fix and exits with 2; `--verbose`
adds the traceback and INFO logging.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import typer

from . import __version__, cli_basis, cli_eval, cli_hub, cli_model, cli_predict, cli_serve, cli_train

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
app = typer.Typer(
    name="adapterkit",
    help="Residual adapters on timm backbones: train domains one after another, publish them to a Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
)
app.command("train", context_settings=CONTEXT)(cli_train.train)
app.command("eval", context_settings=CONTEXT)(cli_eval.evaluate)
app.command("export", context_settings=CONTEXT)(cli_model.export)
app.command("compress", context_settings=CONTEXT)(cli_basis.compress)
app.command("append", context_settings=CONTEXT)(cli_basis.append)
app.command("push", context_settings=CONTEXT)(cli_hub.push)
app.command("pull", context_settings=CONTEXT)(cli_hub.pull)
app.command("list", context_settings=CONTEXT)(cli_hub.list_)
app.command("info", context_settings=CONTEXT)(cli_hub.info)
app.command("serve", context_settings=CONTEXT)(cli_serve.serve)
app.command("predict", context_settings=CONTEXT)(cli_predict.predict)


@dataclass
class Session:
    """What one `main` call learned from the global options (read when reporting an error)."""

    verbose: bool = False
    command: str | None = None


def _version(value: bool) -> None:
    if value:
        print(f"adapterkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="log progress messages; tracebacks on errors")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    session = ctx.obj if isinstance(ctx.obj, Session) else Session()
    session.verbose, session.command = verbose, ctx.invoked_subcommand
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("adapterkit.checkpoint").setLevel(logging.INFO)  # where a --resume starts, always
    # a library's warning is a status line, like the commands' own (--verbose: Python's, with its source)
    if not verbose:
        warnings.showwarning = _warning_line


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    from .cli_output import status

    status(f"warning: {message}")


def _verbose_first(args: list[str]) -> list[str]:
    """`--verbose` (or `-v`) anywhere before `--` moved in front of the command, where typer reads it: errors
    say "rerun with --verbose", and users add it at the end."""
    end = args.index("--") if "--" in args else len(args)
    flags = {i for i in range(end) if args[i] in ("--verbose", "-v")}
    return ["--verbose", *(a for i, a in enumerate(args) if i not in flags)] if flags else args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `adapterkit` console script; returns the exit code.

    0: success; 1: an unexpected error (a bug: rerun with --verbose and report it); 2: a usage error or
    an expected failure (bad data, missing token, unreachable endpoint...), said in one line."""
    from .cli_errors import explain
    from .cli_output import error_line

    session = Session()
    command = typer.main.get_command(app)
    args = _verbose_first(list(sys.argv[1:] if argv is None else argv))
    try:
        with warnings.catch_warnings():  # (the command may show warnings its own way: restored after it)
            command.main(args=args, prog_name="adapterkit", standalone_mode=True, obj=session)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001  (reported in one line; --verbose shows the traceback)
        if session.verbose:
            traceback.print_exc()
        message = explain(e)
        if message is not None:
            print(error_line(session.command, message), file=sys.stderr)
            return 2
        print(error_line(session.command, f"unexpected {type(e).__name__}: {e}"), file=sys.stderr)
        if not session.verbose:
            print("this is a bug: rerun with --verbose for the traceback and report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
