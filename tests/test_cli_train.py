"""`adapterkit train / eval / export` on a tiny image folder."""

from __future__ import annotations

import pytest
import timm
import torch
from cli_support import ROOT, TRAIN, cli, digest, image_folder, table, weights_file  # noqa: F401
from train_support import fresh_accelerate_state  # noqa: F401  (autouse fixture)

from adapterkit import AdapterModel
from adapterkit.cli import main

COMMANDS = ("train", "eval", "export", "push", "pull", "list", "info")


def test_train_eval_export(tmp_path):
    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    weights = weights_file(tmp_path / "backbone.safetensors")
    new = ["--backbone", "test_resnet", "--pretrained", str(weights)]
    again: list[str] = []  # later commands rebuild the backbone the family recorded, without flags
    first = cli(
        "train",
        "--family",
        str(family),
        "--domain",
        "pets",
        "--data",
        str(data),
        "--epochs",
        "2",
        *new,
        *TRAIN,
    )
    assert first.returncode == 0, first.stderr
    assert table(first.stdout)[0][:5] == ["domain", "classes", "steps", "train loss", "accuracy"]
    assert table(first.stdout)[1][:2] == ["pets", "3"]
    assert "1 thread" in first.stderr  # the default, shown while training
    # a library warning (a small held-out split to calibrate routing by) is a status line, not Python's
    assert "warning: " in first.stderr and "calibration images are too few" in first.stderr
    assert "UserWarning" not in first.stderr and ".py:" not in first.stderr
    pets = family / "domains" / "pets.safetensors"
    before = digest(pets)
    more = ["--steps", "2", "--optimizer", "adamw", "--lr", "0.001", "--no-flip", "--threads", "2"]
    second = cli(
        "train",
        "--family",
        str(family),
        "--domain",
        "more",
        "--data",
        str(data / "train"),
        *more,
        *again,
        *TRAIN,
    )
    assert second.returncode == 0, second.stderr
    assert "2 threads" in second.stderr
    assert digest(pets) == before  # adding a domain never rewrites an old domain's file
    again_pets = cli(
        "train", "--family", str(family), "--domain", "pets", "--data", str(data), *again, *TRAIN
    )
    assert (
        again_pets.returncode == 2 and "--overwrite" in again_pets.stderr and "--resume" in again_pets.stderr
    )

    result = cli(
        "eval", "--family", str(family), "--data", f"pets={data}", "--data", f"more={data / 'test'}", *again
    )
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0][:4] == ["domain", "data", "images", "accuracy"]
    assert [row[0] for row in rows[1:]] == ["pets", "more"]

    out = tmp_path / "export"
    assert main(["export", "--family", str(family), "--domain", "pets", "--output", str(out), *again]) == 0
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    model = AdapterModel.from_pretrained(family).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x, domain="pets"), rtol=1e-4, atol=1e-5)
    assert exported.pretrained_cfg["input_size"] == (3, 32, 32)


def test_bad_data_leaves_the_family_untouched(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data", splits=(("train", 2),)), tmp_path / "family"
    (data / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    args = ["--backbone", "test_resnet", "--random-init", *TRAIN]
    code = main(["train", "--family", str(family), "--domain", "pets", "--data", str(data), *args])
    assert code == 2 and "broken.png" in capsys.readouterr().err
    assert not family.exists()
    assert main(["eval", "--family", str(family), "--data", str(data)]) == 2
    assert "not an adapterkit family" in capsys.readouterr().err


def test_help_lists_every_command_with_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "[default: 32]" in out and "--random-init" in out and "--threads" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"adapterkit {__import__('adapterkit').__version__}"


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_model_commands_take_threads(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--threads" in capsys.readouterr().out
    assert main([command, "--threads", "0"]) == 2  # a usage error: at least one thread


def test_a_moved_weights_file_is_named_by_backbone_weights(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    weights = weights_file(tmp_path / "backbone.safetensors")
    new = ["--backbone", "test_resnet", "--pretrained", str(weights), "--steps", "1", *TRAIN]
    assert main(["train", "--family", str(family), "--domain", "pets", "--data", str(data), *new]) == 0
    moved = weights.rename(tmp_path / "moved.safetensors")
    capsys.readouterr()
    assert main(["export", "--family", str(family), "--domain", "pets", "--output", str(tmp_path / "x")]) == 2
    assert "--backbone-weights" in capsys.readouterr().err
    args = ["--family", str(family), "--data", f"pets={data}", "--backbone-weights", str(moved)]
    assert main(["eval", *args, "--no-progress"]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)[1:]] == ["pets"]
