"""Checks before training that report every problem at once, named, with the fix."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from train_support import SIZE, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)
from train_support import image_folder as _image_folder

from adapterkit.data import SHOW_FAILURES
from adapterkit.train import train_domain


def _folder_with_broken_images(root, broken: int):
    _image_folder(root, per_class=3)
    for i in range(broken):
        (root / "ab"[i % 2] / f"broken{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_every_undecodable_image_is_counted_and_the_first_ones_named(tmp_path):
    root = _folder_with_broken_images(tmp_path / "data", broken=SHOW_FAILURES + 5)
    model = make_model()
    with pytest.raises(ValueError) as info:
        train_domain(model, "d", root, config=cfg(output_dir=str(tmp_path / "out")), data_config=SIZE)
    message = str(info.value)
    assert message.startswith(f"{SHOW_FAILURES + 5} images of the training data cannot be decoded")
    named = [line for line in message.splitlines() if re.search(r"broken\d\d\.png", line)]
    assert len(named) == SHOW_FAILURES
    assert message.rstrip().endswith("... and 5 more")
    assert model.domains == [] and not (tmp_path / "out").exists()


def test_undecodable_images_of_a_checked_sample_say_so(tmp_path):
    root = _folder_with_broken_images(tmp_path / "data", broken=10)  # 16 images, 10 broken
    with pytest.raises(ValueError, match=r"images of the 12 checked \(check_images=None checks all 16\)"):
        train_domain(make_model(), "d", root, config=cfg(check_images=12), data_config=SIZE)


def test_loose_images_next_to_class_folders_are_ignored_with_a_warning(tmp_path, caplog):
    root = _image_folder(tmp_path / "data")
    Image.new("RGB", (20, 20)).save(root / "stray.png")
    model = make_model()
    train_domain(model, "d", root, config=cfg(steps=1), data_config=SIZE)
    assert model.domain_info("d").labels == ["a", "b"]
    assert "1 images outside the class subfolders are ignored" in caplog.text
