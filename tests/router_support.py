"""Routing tests' shared pieces: three separable colour domains, images of none of them, and a way to
rewrite a saved domain's tensors."""

from __future__ import annotations

import json

import torch
from checks import perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterkit import AdapterModel
from adapterkit.format import domain_entry_file, domain_file, sha256

COLOURS = {"red": (2.0, -1.0, -1.0), "green": (-1.0, 2.0, -1.0), "blue": (-1.0, -1.0, 2.0)}


def images(colour: str, n: int, seed: int) -> torch.Tensor:
    """Noisy images of one dominant colour: three clearly separable domains."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(COLOURS[colour])[None, :, None, None]
    return base + 0.5 * torch.randn(n, 3, 32, 32, generator=g)


def unknown(n: int, seed: int) -> torch.Tensor:
    """Images of none of the domains: a strong checkerboard."""
    g = torch.Generator().manual_seed(seed)
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 6.0 - 3.0
    return board.expand(n, 3, 32, 32) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def batches(x: torch.Tensor, size: int = 16):
    return (x[i : i + size] for i in range(0, len(x), size))


def rewrite_domain_file(family, name: str, edit) -> None:
    """Apply `edit` to a saved domain's tensors, as another release (or a damaged file) would have them,
    keeping the family's checksum of the file right."""
    path = family / domain_file(name)
    state = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    edit(state)
    save_file(state, path, metadata=metadata)
    entry_path = family / domain_entry_file(name)
    entry = json.loads(entry_path.read_text())
    entry["sha256"] = sha256(path.read_bytes())
    entry_path.write_text(json.dumps(entry))


def colour_model() -> AdapterModel:
    """A `test_resnet` model with the three colour domains, each with its signature, in eval mode."""
    model = AdapterModel.from_backbone("test_resnet")
    for i, colour in enumerate(COLOURS):
        model.add_domain(colour, num_classes=2 + i)
        perturb(model, colour, seed=i)
        model.fit_signature(colour, batches(images(colour, 96, seed=i)))
    return model.eval()


def without_open_calibration(model: AdapterModel, folder, domain: str = "red") -> AdapterModel:
    """`model` saved to `folder` with `domain`'s signature as written before the open-set calibration (no
    score quantiles or head energies), loaded back."""
    from adapterkit.family import save_family
    from adapterkit.signature import OPEN_BUFFERS

    save_family(model, folder)

    def written_before_it(state: dict) -> None:
        for key in OPEN_BUFFERS:
            del state[f"signature.{key}"]

    rewrite_domain_file(folder, domain, written_before_it)
    return AdapterModel.from_pretrained(folder)
