"""`adapterkit predict SOURCE IMAGE...`: classify image files with a family, without a server.

The answers are the inference service's (`Service.respond`, the code behind `POST /v1/predict`): each
image decoded with the same limits, preprocessed with its domain's recorded data config, and the images
run as mixed-domain batches; `--domain auto` routes each image by the domains' signatures and may answer
that it fits none. A folder argument stands for the image files inside it at any depth (a class-folder
split works as it is), sorted by path. An image that cannot be classified (not an image, too large) gets a
row saying why; the others are still answered, and the command then exits with 2.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_errors import CliError
from .cli_model import Precision, backbone_errors, plural
from .cli_output import print_table, status
from .cli_serve import (
    MAX_PIXELS,
    BackboneWeights,
    DecodeThreads,
    Device,
    MaxPixels,
    MixedPrecision,
    TorchThreads,
    check_device,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_files(paths: list[Path]) -> list[Path]:
    """The files to classify: each file as given, each folder's image files at any depth (by suffix), sorted."""
    files = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise CliError(
                    f"{path} holds no image files at any depth ({', '.join(IMAGE_SUFFIXES)}); pass image files"
                )
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"{path} does not exist; pass image files or folders of them")
    return files


def pick_domain(domain: str | None, loaded: list[str], routable: bool) -> str:
    """The domain to ask for: the one given, `auto` when every loaded domain can route (one domain too, so
    that images of no domain come back unknown, as the service answers them), else the only one loaded."""
    if domain is not None:
        return domain
    if routable:
        return "auto"
    if len(loaded) == 1:
        return loaded[0]
    raise CliError(
        f"the family has {len(loaded)} domains ({', '.join(loaded)}) and not every one has a signature to "
        "route by: pass --domain NAME"
    )


def rows(files: list[Path], predictions: list[dict[str, Any]]) -> list[list[object]]:
    """One table row per image: its file, domain (`unknown` when routing found none, `error` when the image
    could not be classified), label (for `unknown`, the routing confidence: how typical the image is of
    the nearest domain, no class probability) and score (the label's probability)."""
    out = []
    for path, p in zip(files, predictions, strict=True):
        if "error" in p:
            out.append([str(path), "error", p["error"]["message"], ""])
        elif p.get("unknown"):
            c = p["confidence"]
            confidence = "" if c is None else f"(routing confidence {c:.4f})"
            out.append([str(path), f"unknown (nearest {p['nearest']})", confidence, ""])
        else:
            out.append([str(path), p["domain"], p["label"], p["score"]])
    return out


async def _ask(service: Any, chunk: list[Path], domain: str, top_k: int) -> list[dict[str, Any]]:
    """The service's answers for `chunk`, as one request."""
    from .serve_predict import Parsed

    parsed = Parsed([path.read_bytes() for path in chunk], [domain] * len(chunk), top_k=top_k)
    answer = await service.respond(parsed, names=[str(path) for path in chunk])
    return [{"image": str(path), **p} for path, p in zip(chunk, answer["predictions"], strict=True)]


async def _predict(service: Any, files: list[Path], domain: str, top_k: int) -> list[dict[str, Any]]:
    """Answers for every file, in requests of at most `max_images`; a request that fails on one image
    (the service answers a request whole) is asked again image by image, and an image it cannot read is
    answered with its error."""
    from .serve_errors import ServeError
    from .serve_images import IMAGE_ERRORS

    answers = []
    for start in range(0, len(files), service.max_images):
        chunk = files[start : start + service.max_images]
        try:
            answers += await _ask(service, chunk, domain, top_k)
            continue
        except ServeError as e:
            if e.code not in IMAGE_ERRORS:
                raise
        for path in chunk:
            try:
                answers += await _ask(service, [path], domain, top_k)
            except ServeError as e:
                if e.code not in IMAGE_ERRORS:
                    raise
                answers.append({"image": str(path), "error": {"code": e.code, "message": e.message}})
    return answers


def predict(
    source: Annotated[
        str, typer.Argument(help="family folder, or Hub/registry repo id with an optional @revision")
    ],
    images: Annotated[list[Path], typer.Argument(help="image files, or folders of them", show_default=False)],
    domain: Annotated[
        str | None,
        typer.Option(
            help="the images' domain, or auto to route each one "
            "\\[default: auto when every domain has a signature, else the only domain]",
            show_default=False,
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=1000, help="classes listed per image in --json")] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the service's JSON answers, one per line")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward")] = 32,
    decode_threads: DecodeThreads = 2,
    torch_threads: TorchThreads = None,
    device: Device = "cpu",
    mixed_precision: MixedPrecision = Precision.no,
    max_pixels: MaxPixels = MAX_PIXELS,
    backbone_weights: BackboneWeights = None,
) -> None:
    """Classify image files with a family's domains, as the inference service would answer them.

    Example: adapterkit predict fam/ cat.png photos/ --domain pets
    """
    files = image_files(images)
    import torch

    from .serve import Service
    from .serve_errors import ServeError
    from .serve_run import load_family

    check_device(device)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    only = None if domain in (None, "auto") else [domain]  # load only the files it needs
    with backbone_errors(source, None):
        model, repo, revision = load_family(
            source, domains=only, device=device, backbone_weights=backbone_weights
        )
    domain = pick_domain(domain, model.domains, all(d in model.signatures for d in model.domains))
    service = Service(
        model,
        max_batch_size=batch_size,
        max_wait_ms=0.0,
        queue_size=max(256, batch_size),
        admin_token=None,
        threads=decode_threads,
        max_body_bytes=0,  # (no request bodies: files are read here)
        max_pixels=max_pixels,
        max_images=max(64, batch_size),
        source=repo,
        revision=revision,
        mixed_precision=mixed_precision.value,
    )
    status(f"classifying {plural(len(files), 'image')} with {plural(len(model.domains), 'domain')} of {repo}")
    try:
        answers = asyncio.run(_predict(service, files, domain, top_k))
    except ServeError as e:
        raise CliError(e.message) from None
    finally:
        service.close()
    if as_json:
        print("\n".join(json.dumps(a) for a in answers))
    else:
        print_table(["image", "domain", "label", "score"], rows(files, answers))
    failed = sum("error" in a for a in answers)
    if failed:
        raise CliError(f"{failed} of {plural(len(files), 'image')} could not be classified (see their rows)")
