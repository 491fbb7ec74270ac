"""What the training tests share: a toy dataset, a model, a config and the Accelerate state reset.

A plain helper module, so no test file imports another. A test module that needs the reset imports
the fixture by name (`from train_support import fresh_accelerate_state  # noqa: F401`), which makes
it autouse for that module only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.train import TrainConfig

SIZE = {"input_size": 32}
"""`data_config` of the toy domains: 32 x 32 inputs keep the tiny models fast."""


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process and tests use different mixed-precision settings; one
    torch thread keeps these tiny models fast on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Toy(torch.utils.data.Dataset):
    """Class-dependent noise images (C, 40, 40) in [0, 1]; `targets` lets labels be read without images."""

    def __init__(self, n: int, k: int, seed: int = 0, channels: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, k, (n,), generator=g).tolist()
        y = torch.tensor(self.targets, dtype=torch.float32).view(-1, 1, 1, 1)
        self.x = torch.rand(n, channels, 40, 40, generator=g) * 0.4 + y / k * 0.6

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


def make_model(name: str = "test_resnet", config: AdapterConfig | None = None) -> AdapterModel:
    torch.manual_seed(0)
    return AdapterModel.from_backbone(timm.create_model(name), config)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "lr": 0.05, "progress": False, **kw})


def image_folder(root: Path, modes=("RGB",), per_class=3, classes=("a", "b")) -> Path:
    """A class-per-subfolder image folder of 20 x 20 PNGs (`modes` cycles per image, e.g. ("L", "RGB"))."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            mode = modes[i % len(modes)]
            Image.new(mode, (20, 20), 128 if mode == "L" else (10 * i, 50, 200)).save(root / c / f"{i}.png")
    return root
