"""`adapterkit train / eval / export` on a tiny image folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_train import fresh_accelerate_state  # noqa: F401  (autouse fixture)

from adapterkit import AdapterModel
from adapterkit.cli import COMMANDS, _backbone, main

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--backbone", "test_resnet", "--batch-size", "4", "--image-size", "32", "--no-progress"]


def image_folder(root: Path, splits=(("train", 6), ("test", 3))) -> Path:
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200)), ("owl", (30, 200, 30))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = (np.array(color) + rng.integers(-30, 30, (24, 24, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "adapterkit.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_eval_export(tmp_path):
    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    first = cli(
        "train", "--family", str(family), "--domain", "pets", "--data", str(data), "--epochs", "2", *TRAIN
    )
    assert first.returncode == 0, first.stderr
    assert "pets" in first.stdout and "accuracy" in first.stdout
    pets = family / "domains" / "pets.safetensors"
    before = digest(pets)
    second = cli(
        "train",
        "--family",
        str(family),
        "--domain",
        "more",
        "--data",
        str(data / "train"),
        "--steps",
        "2",
        "--optimizer",
        "adamw",
        "--lr",
        "0.001",
        "--no-flip",
        *TRAIN[2:],
    )
    assert second.returncode == 0, second.stderr
    assert digest(pets) == before  # adding a domain never rewrites an old domain's file
    again = cli("train", "--family", str(family), "--domain", "pets", "--data", str(data), *TRAIN[2:])
    assert again.returncode == 2 and "--overwrite" in again.stderr

    result = cli("eval", "--family", str(family), "--data", f"pets={data}", "--data", f"more={data / 'test'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["domain", "data", "images", "accuracy"]
    assert [line.split()[0] for line in lines[1:]] == ["pets", "more"]

    out = tmp_path / "export"
    assert main(["export", "--family", str(family), "--domain", "pets", "--output", str(out)]) == 0
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    model = AdapterModel.from_pretrained(family, backbone=_backbone("test_resnet", None)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x, domain="pets"), rtol=1e-4, atol=1e-5)
    assert exported.pretrained_cfg["input_size"] == (3, 32, 32)


def test_bad_data_leaves_the_family_untouched(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data", splits=(("train", 2),)), tmp_path / "family"
    (data / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    code = main(["train", "--family", str(family), "--domain", "pets", "--data", str(data), *TRAIN])
    assert code == 2 and "broken.png" in capsys.readouterr().err
    assert not family.exists()
    assert main(["eval", "--family", str(family), "--data", str(data)]) == 2
    assert "not an adapterkit family" in capsys.readouterr().err


def test_commands_are_registered_in_one_tree():
    assert {"train", "eval", "export"} <= set(COMMANDS)
    with pytest.raises(SystemExit):
        main(["--help"])
