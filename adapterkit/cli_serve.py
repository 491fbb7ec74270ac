"""`adapterkit serve SOURCE`: serve a family over HTTP (`adapterkit.serve`, docs/serve.md).

SOURCE is a family folder or a Hub/registry repo id, optionally `@revision`; the backbone is rebuilt
from what the family records. The admin token of the write endpoints comes from `--admin-token-file`
or `ADAPTERKIT_ADMIN_TOKEN`, never from the command line (where `ps` and shell history would show it);
without one, domains cannot be added or removed over HTTP. torch and the web stack are imported after
the arguments are parsed.
"""

from __future__ import annotations

import errno
import os
import stat
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import CliError
from .cli_model import Precision, backbone_errors, plural
from .cli_output import status

TOKEN_ENV = "ADAPTERKIT_ADMIN_TOKEN"


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


# options `serve` and `predict` share
# (not `--threads`, which is torch's threads in train, eval and export)
DecodeThreads = Annotated[
    int, typer.Option("--decode-threads", min=1, help="threads decoding and preprocessing images")
]
TorchThreads = Annotated[
    int | None,
    typer.Option(min=1, help="torch CPU threads for the forward \\[default: torch's]", show_default=False),
]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps")]
MixedPrecision = Annotated[
    Precision,
    typer.Option(
        help="autocast dtype of the forward: bf16 (GPUs; CPUs with AVX-512 BF16 or AMX), fp16 (GPUs)"
    ),
]
MaxPixels = Annotated[int, typer.Option(min=1, help="largest image decoded, in pixels (decompression bombs)")]
MAX_PIXELS = 40_000_000  # serve_images.DEFAULT_MAX_PIXELS, without importing torch here
BackboneWeights = Annotated[
    Path | None,
    typer.Option(help="the backbone weights file the family was trained on, if it moved", show_default=False),
]


def check_device(device: str) -> None:
    """A one-line error for a device torch does not know, or that this machine lacks."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise CliError(
            f"--device {device!r} is not a device torch knows; pass cpu, cuda, cuda:1 or mps"
        ) from e
    if parsed.type == "cuda" and (
        not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()
    ):
        raise CliError(
            f"--device {device}: this machine has {plural(torch.cuda.device_count(), 'CUDA device')} "
            "usable by torch; pass --device cpu, or an index below that count"
        )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device}: MPS is not available on this machine; pass --device cpu")


def check_port(host: str, port: int) -> int:
    """The port to listen on (port 0: a free one, so that the address printed is the real one); fails at
    once, not after loading the family, when `host:port` cannot be listened on."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
            return probe.getsockname()[1]
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            fix = "pass another --port or stop what holds it"
        elif e.errno == errno.EACCES:
            fix = "ports below 1024 need privileges: pass --port 1024 or above (a reverse proxy takes 443)"
        else:  # a name that does not resolve, an address of another machine
            fix = "--host is an address of this machine: 127.0.0.1 (loopback) or 0.0.0.0 (every interface)"
        raise CliError(f"cannot listen on {host}:{port} ({e.strerror or e}); {fix}") from e


def admin_token(token_file: Path | None) -> str | None:
    """The admin token from `token_file` (first line) or `ADAPTERKIT_ADMIN_TOKEN`, or None."""
    if token_file is not None:
        try:
            text = token_file.read_text()
            mode = token_file.stat().st_mode
        except OSError as e:
            fix = "check the path"
            if e.errno == errno.EACCES:  # a root-owned file, a service that runs as its own user
                fix = "make it readable by the user the server runs as (chown that user, chmod 600)"
            raise CliError(f"cannot read the admin token file {token_file} ({e.strerror}); {fix}") from e
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise CliError(f"the admin token file {token_file} is empty; write a long random token into it")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            status(f"warning: {token_file} is readable by other users; chmod 600 {token_file}")
        if os.environ.get(TOKEN_ENV, "").strip() not in ("", token):
            status(f"warning: ${TOKEN_ENV} is set too; the token of {token_file} is the one used")
    else:
        value = os.environ.get(TOKEN_ENV)
        if value is None:
            return None
        token = value.strip()
        if not token:  # `ADAPTERKIT_ADMIN_TOKEN=$(cat token)` with a missing file: not a read-only server
            raise CliError(
                f"${TOKEN_ENV} is set but empty; put the admin token in it (or use --admin-token-file), "
                f"or unset it to serve read-only"
            )
    if len(token) < 8:
        raise CliError(
            "the admin token is shorter than 8 characters; use a long random one (openssl rand -hex 32)"
        )
    return token


def serve(
    source: Annotated[
        str, typer.Argument(help="family folder, or Hub/registry repo id with an optional @revision")
    ],
    domain: Annotated[
        list[str] | None,
        typer.Option(
            "--domain", help="load only this domain (repeatable) \\[default: all]", show_default=False
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="port to listen on (0: a free one, printed)")
    ] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="images per forward (1: no batching)")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, max=60000, help="how long a batch waits for more images")
    ] = 5.0,
    queue_size: Annotated[int, typer.Option(min=1, help="images that may wait; then 503")] = 256,
    decode_threads: DecodeThreads = 2,
    torch_threads: TorchThreads = None,
    device: Device = "cpu",
    mixed_precision: MixedPrecision = Precision.no,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"file holding the admin token of the write endpoints \\[default: ${TOKEN_ENV} if set, "
            "else none: read-only]",
            show_default=False,
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="largest request body")] = 32.0,
    max_images: Annotated[
        int, typer.Option(min=1, help="most images in one request (at most --queue-size)")
    ] = 64,
    max_pixels: MaxPixels = MAX_PIXELS,
    fusion_capacity: Annotated[
        int | None,
        typer.Option(
            min=0, help="domains whose fused weights each layer keeps \\[default: 4]", show_default=False
        ),
    ] = None,
    backbone_weights: BackboneWeights = None,
    no_freeze_gc: Annotated[
        bool,
        typer.Option(
            "--no-freeze-gc",
            help="leave the startup objects in full garbage collections (by default they are kept out: "
            "shorter tail latency)",
        ),
    ] = False,
    log_level: Annotated[
        LogLevel,
        typer.Option(help="info: startup, address, admin changes and refusals, stop; warning: problems"),
    ] = LogLevel.info,
    access_log: Annotated[bool, typer.Option("--access-log", help="log one line per request")] = False,
    graceful_timeout: Annotated[
        float, typer.Option(min=0, help="seconds to answer the requests in flight after SIGTERM/Ctrl-C")
    ] = 20.0,
    root_path: Annotated[
        str, typer.Option(help="path prefix a reverse proxy serves this under (/ak), for /docs and links")
    ] = "",
) -> None:
    """Serve a family over HTTP: predict with per-image domains, list, hot-add and remove domains.

    Example: ADAPTERKIT_ADMIN_TOKEN=$(cat token) adapterkit serve fam/ --domain gtsrb --port 8000
    """
    token = admin_token(admin_token_file)
    port = check_port(host, port)
    import torch

    from .serve import create_app
    from .serve_run import load_family, run_server

    check_device(device)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    with backbone_errors(source, None):
        model, repo, revision = load_family(
            source, domains=domain, device=device, backbone_weights=backbone_weights
        )
    app = create_app(
        model,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        admin_token=token,
        threads=decode_threads,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_images=max_images,
        source=repo,
        revision=revision,
        fusion_capacity=fusion_capacity,
        mixed_precision=mixed_precision.value,
        freeze_gc=not no_freeze_gc,
    )
    admin = (
        "admin endpoints on" if token else f"read-only: no admin token (--admin-token-file or ${TOKEN_ENV})"
    )
    status(
        f"serving {plural(len(model.domains), 'domain')} of {repo} on http://{host}:{port} ({admin}; "
        f"{plural(torch.get_num_threads(), 'torch thread')}, batches of up to {max_batch_size}); API at /docs"
    )
    run_server(
        app,
        host,
        port,
        log_level=log_level.value,
        access_log=access_log,
        graceful_timeout=graceful_timeout,
        root_path=root_path,
    )
