"""`adapterkit train / eval / export` on a tiny image folder."""

from __future__ import annotations

import os
import time

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


def test_every_commands_help_fits_an_80_column_terminal():
    """No option name or word of a command's help is cut with an ellipsis at 80 columns (`serve`'s
    negative flags took a column of their own and cut --admin-token-file to --admin-token-fi…)."""
    import typer
    from typer.testing import CliRunner

    from adapterkit.cli import app

    commands = sorted(typer.main.get_command(app).commands)
    assert {"serve", "predict", *COMMANDS} <= set(commands)
    for command in commands:
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert result.exit_code == 0, result.output
        assert max(map(len, result.output.splitlines())) <= 80
        cut = [line for line in result.output.splitlines() if "\u2026" in line]
        assert not cut, (command, cut)


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


def test_cli_messages_name_flags_and_what_a_run_records(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    args = ["--family", str(family), "--domain", "pets", "--data", str(data), *TRAIN]
    new = ["--backbone", "test_resnet", "--random-init"]
    assert main(["train", *args, *new, "--epochs", "1", "--steps", "2"]) == 2
    assert "give --epochs or --steps, not both" in capsys.readouterr().err  # flags, not TrainConfig fields
    assert main(["train", *args, *new, "--checkpoint-every", "0"]) == 2  # 0 would checkpoint nothing
    capsys.readouterr()
    assert main(["train", *args, *new, "--steps", "2", "--output-dir", str(tmp_path / "out")]) == 0
    assert "--output-dir without --checkpoint-every or --log-with writes nothing" in capsys.readouterr().err
    record = AdapterModel.from_pretrained(family).domain_info("pets").metadata["training"]
    assert record["data"] == "data/train" and record["train_images"] == 18 and record["eval_images"] == 9
    assert record["steps"] == 2 and record["config"]["steps"] == 2 and record["config"]["seed"] == 0
    assert "output_dir" not in record["config"] and str(tmp_path) not in str(record)  # no local paths
    out = tmp_path / "ck"
    resume = ["--resume", "--output-dir", str(out), "--checkpoint-every", "1", "--steps", "2"]
    run = cli("train", *args, "--domain", "more", *resume)  # a process of its own: the CLI's logging
    assert run.returncode == 0, run.stderr
    assert (
        f"no checkpoint of 'more' in {out / 'checkpoints' / 'more'}: its training starts at step 0"
        in run.stderr
    )


def test_columns_of_a_saved_dataset_are_named_by_flags(tmp_path, capsys):
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    images = [
        datasets.Image().encode_example(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(8)
    ]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict({"img": images, "fine": [0, 1] * 4}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "ds"))
    family = tmp_path / "family"
    args = ["--family", str(family), "--domain", "d", "--data", str(tmp_path / "ds"), "--steps", "1", *TRAIN]
    new = ["--backbone", "test_resnet", "--random-init"]
    assert main(["train", *args, *new]) == 2
    assert "--image-column/--label-column" in capsys.readouterr().err
    assert main(["train", *args, *new, "--image-column", "img", "--label-column", "fine"]) == 0
    assert AdapterModel.from_pretrained(family).domain_info("d").labels == ["x", "y"]
    cols = ["--image-column", "img", "--label-column", "fine"]
    assert main(["eval", "--family", str(family), "--data", f"d={tmp_path / 'ds'}", *cols]) == 0
    assert f"{tmp_path / 'ds'} (test)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'test'\] of a DatasetDict: pass one"):
        from adapterkit.data import open_data

        open_data(tmp_path / "ds")


def test_an_interrupted_training_says_what_it_left_and_how_to_continue(tmp_path):
    import signal
    import subprocess
    import sys

    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    cmd = [sys.executable, "-m", "adapterkit.cli", "train", "--family", str(family), "--domain", "pets"]
    cmd += ["--data", str(data), "--backbone", "test_resnet", "--random-init", "--steps", "100000", *TRAIN]
    cmd += ["--output-dir", str(tmp_path / "out"), "--checkpoint-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Ctrl-C as a terminal sends it; a shell runs background jobs (CI) with SIGINT ignored, which the child
    # would inherit, so it gets the default back
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=restore)
    try:
        while "training 'pets'" not in (line := proc.stderr.readline()):  # warnings come first
            assert line, "the training never started"
        for _ in range(600):  # until the first checkpoint (at most 60 s)
            if (tmp_path / "out" / "checkpoints" / "pets" / "checkpoint.json").exists():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()  # (a no-op once it has exited)
    assert proc.returncode == 130, err
    assert "interrupted: 'pets' was not saved; rerun the command with --resume" in err
    assert str(tmp_path / "out" / "checkpoints" / "pets") in err and not family.exists()


def test_an_export_into_a_family_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    """`--output` naming the family folder itself (or another family's) would mix a timm model's
    config.json and model.safetensors into the family's files."""
    from adapterkit.export import save_export

    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("pets", num_classes=3)
    family = tmp_path / "family"
    model.save_pretrained(family)
    before = sorted(p.relative_to(family) for p in family.rglob("*"))
    with pytest.raises(ValueError, match="is an adapterkit family folder.*pass a new folder"):
        save_export(model, "pets", family)
    assert main(["export", "--family", str(family), "--domain", "pets", "--output", str(family)]) == 2
    err = capsys.readouterr().err
    assert f"--output {family} is an adapterkit family folder" in err and "pass a new folder" in err
    assert sorted(p.relative_to(family) for p in family.rglob("*")) == before


def test_resume_of_a_domain_the_family_lacks_names_the_flags(tmp_path, capsys):
    """`--resume` of a domain with nothing to resume (not in the family, no --output-dir) used to answer in
    Python terms, "resume=True needs TrainConfig(output_dir=...)", after loading the family."""
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("pets", num_classes=3)
    family = tmp_path / "family"
    model.save_pretrained(family)
    data = image_folder(tmp_path / "data")
    args = ["--domain", "birds", "--data", str(data), "--resume", "--steps", "1", *TRAIN]
    assert main(["train", "--family", str(family), *args]) == 2
    err = capsys.readouterr().err
    assert f"{family} has no domain 'birds' to resume" in err and "drop --resume" in err
    assert "--output-dir" in err and "TrainConfig" not in err
    new = tmp_path / "new"
    assert main(["train", "--family", str(new), "--backbone", "test_resnet", "--random-init", *args]) == 2
    assert "has no domain 'birds' to resume" in capsys.readouterr().err and not new.exists()


def test_train_into_a_hub_repo_id_says_to_pull_it_first(tmp_path, capsys, monkeypatch):
    """`--family alice/fam` (a repo id: train writes into folders) said only "pass --backbone"."""
    monkeypatch.chdir(tmp_path)
    data = image_folder(tmp_path / "data")
    assert main(["train", "--family", "alice/fam", "--domain", "d", "--data", str(data), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "alice/fam is not a family yet: pass --backbone NAME" in err
    assert "for the Hub family alice/fam, run `adapterkit pull alice/fam DIR` and train into DIR" in err
    assert main(["train", "--family", "fam", "--domain", "d", "--data", str(data), *TRAIN]) == 2
    assert "pull" not in capsys.readouterr().err  # a folder here: only --backbone
    assert not (tmp_path / "alice").exists() and not (tmp_path / "fam").exists()
