"""What the command-line tests share: the repository root, training flags, image folders, weights files,
running the real `adapterkit` command, and reading its Markdown tables."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--batch-size", "4", "--image-size", "32", "--no-progress"]


def image_folder(root: Path, splits=(("train", 6), ("test", 3))) -> Path:
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200)), ("owl", (30, 200, 30))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = (np.array(color) + rng.integers(-30, 30, (24, 24, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def weights_file(path: Path, name: str = "test_resnet", seed: int = 0) -> Path:
    """A timm backbone's weights as a safetensors file (what `--pretrained FILE` takes)."""
    torch.manual_seed(seed)
    save_file(timm.create_model(name).state_dict(), path)
    return path


def table(text: str) -> list[list[str]]:
    """The rows of the Markdown table in `text` (header first), cells stripped."""
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row] for row in rows if not set("".join(row)) <= set("-: ")]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "adapterkit.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
