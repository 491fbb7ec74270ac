"""`adapterkit eval` writes the accuracy matrix (JSON, CSV) and its figures, for one family (one row) or
snapshots of a family after each domain (the continual matrix, with ACC, BWT and forgetting)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import timm
from cli_support import TRAIN, cli, image_folder, table, weights_file
from train_support import fresh_accelerate_state  # noqa: F401  (autouse fixture)

from adapterkit.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """`after-pets` holds domain pets; `after-more` is a copy of it that then trained domain more."""
    root = tmp_path_factory.mktemp("eval")
    data = image_folder(root / "data")
    weights = weights_file(root / "backbone.safetensors")
    first, second = root / "after-pets", root / "after-more"
    new = ["--backbone", "test_resnet", "--pretrained", str(weights)]
    args = ["--data", str(data), "--epochs", "2", *TRAIN]
    assert main(["train", "--family", str(first), "--domain", "pets", *args, *new]) == 0
    shutil.copytree(first, second)
    assert main(["train", "--family", str(second), "--domain", "more", *args]) == 0
    return data, first, second


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_one_family_is_one_row(families, tmp_path):
    data, _, family = families
    out = [tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"]
    flags = ["--output", str(out[0]), "--output", str(out[1]), "--plot", str(out[2])]
    run = cli("eval", "--family", str(family), "--data", f"pets={data}", "--data", f"more={data}", *flags)
    assert run.returncode == 0, run.stderr
    rows = table(run.stdout)
    assert rows[0][:4] == ["domain", "data", "images", "accuracy"]  # the table of before, unchanged
    printed = {row[0]: float(row[3]) for row in rows[1:]}

    result = json.loads(out[0].read_text())
    assert result["domains"] == ["pets", "more"] and result["rows"] == [str(family)]
    (row,) = result["matrix"]
    assert [round(a, 4) for a in row] == [printed["pets"], printed["more"]]
    assert result["metrics"]["mean_accuracy"] == [pytest.approx(sum(row) / 2)]
    assert not result["sequence"] and "acc" not in result["metrics"] and "decathlon" not in result["metrics"]
    config = json.loads((family / "adapterkit.json").read_text())
    record = result["families"][0]
    assert record["fingerprint"] == config["backbone"]["fingerprint"] and record["backbone"] == "test_resnet"
    row_names = ("pets", "more")
    for name in row_names:  # the exact files evaluated
        entry = json.loads((family / "domains" / f"{name}.json").read_text())
        assert record["domains"][name]["sha256"] == entry["sha256"]
        assert record["domains"][name]["split"] == "test" and record["domains"][name]["images"] == 9
    own = {
        name: json.loads((family / "domains" / f"{name}.json").read_text())["parameters"]
        for name in row_names
    }
    backbone = sum(p.numel() for p in timm.create_model("test_resnet", num_classes=0).parameters())
    assert record["parameters"]["domains"] == own and record["parameters"]["backbone"] == backbone
    assert result["metrics"]["total_parameters"] == [pytest.approx(1 + sum(own.values()) / backbone)]
    assert read_csv(out[1]) == [["family", "pets", "more"], [str(family), *map(repr, row)]]
    assert out[2].read_bytes()[:8] == PNG and out[2].stat().st_size > 5_000
    assert f"{family}: mean accuracy {sum(row) / 2:.4f} over 2 domains" in run.stdout


def test_snapshots_make_the_continual_matrix(families, tmp_path, capsys):
    data, first, second = families
    out = tmp_path / "r.json"
    base = {"pets": 0.5, "more": 0.8}
    args = [
        "--family",
        str(first),
        "--family",
        str(second),
        "--data",
        f"pets={data}",
        "--data",
        f"more={data}",
    ]
    baseline = [f"--baseline-error={name}={err}" for name, err in base.items()]
    flags = ["--output", str(out), "--output", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.svg")]
    assert main(["eval", *args, *baseline, *flags, "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    (a, missing), (a_after, b) = result["matrix"]
    assert missing is None and a_after == a  # pets is bit-identical after training more: same accuracy
    m = result["metrics"]
    assert (
        result["sequence"]
        and m["acc"] == pytest.approx((a + b) / 2)
        and m["bwt"] == 0
        and m["forgetting"] == 0
    )
    assert "continual: ACC" in stdout and table(stdout)[0][0] == "family"

    def score(name, acc):  # the Visual Decathlon score, written out: 1000 (max(0, 2 E_base - E) / 2 E_base)^2
        return 1000 * (max(0.0, 2 * base[name] - (1 - acc)) / (2 * base[name])) ** 2

    assert m["decathlon"] == [
        pytest.approx(score("pets", a)),
        pytest.approx(score("pets", a) + score("more", b)),
    ]
    assert result["baseline_errors"] == base
    assert read_csv(tmp_path / "r.csv")[1] == [str(first), repr(a), ""]  # empty: not trained yet
    svg = (tmp_path / "r.svg").read_text()
    assert f">{first}<" in svg and f">{second}<" in svg and ">family<" in svg

    # Not snapshots in training order: no continual metrics.
    assert main(["eval", *args[2:4], *args[:2], *args[4:], "--output", str(out), "--no-progress"]) == 0
    assert not json.loads(out.read_text())["sequence"] and "acc" not in json.loads(out.read_text())["metrics"]
    assert f"pass --family in training order ({first}, {second}) for ACC" in capsys.readouterr().err


def test_bars_compare_families_on_every_domain(families, tmp_path, capsys):
    data, first, second = families
    twin = tmp_path / "twin"
    shutil.copytree(second, twin)
    domains = ["--data", f"pets={data}", "--data", f"more={data}", "--no-progress"]
    bars, out = tmp_path / "b.png", tmp_path / "r.json"
    assert main(["eval", "--family", str(second), "--family", str(twin), *domains, "--bars", str(bars)]) == 0
    assert bars.read_bytes()[:8] == PNG and bars.stat().st_size > 5_000
    capsys.readouterr()
    args = [
        "--family",
        str(first),
        "--family",
        str(second),
        *domains,
        "--bars",
        str(bars),
        "--output",
        str(out),
    ]
    bars.unlink()
    assert main(["eval", *args]) == 2
    assert f"{first} lacks some" in capsys.readouterr().err
    assert not bars.exists() and not out.exists()  # refused before evaluating anything


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "{tmp}/r.txt"], "name it .json or .csv"),
        (["--plot", "{tmp}/r.jpg"], "name it .png or .svg or .pdf"),
        (["--output", "{tmp}/missing/r.json"], "does not exist; create it first"),
        (["--baseline-error", "pets=12"], "a fraction in (0, 1]"),
        (["--baseline-error", "pets=0.1"], "no error for more"),
        (["--family", "{second}"], "is given twice"),
        (["--data", "pets={data}"], "gives domain 'pets' more than once"),
        (["--data", "nope={data}"], "has no domain 'nope'"),
    ],
)
def test_bad_arguments_fail_before_evaluating(families, tmp_path, capsys, extra, message):
    data, _, second = families
    fill = {"tmp": tmp_path, "second": second, "data": data}
    args = ["--family", str(second), "--data", f"pets={data}", "--data", f"more={data}"]
    assert main(["eval", *args, *(e.format(**fill) for e in extra)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_a_domain_no_family_has(families, capsys):
    data, first, second = families
    assert main(["eval", "--family", str(first), "--family", str(second), "--data", f"nope={data}"]) == 2
    assert "no --family has domain 'nope'; they have: pets, more" in capsys.readouterr().err


def test_help_names_the_matrix_flags(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--output", "--plot", "--bars", "--baseline-error", "--family"))


def test_a_folder_with_only_a_training_split_is_refused_and_splits_are_named(families, tmp_path, capsys):
    """eval scores held-out images: a folder whose only split is train/ would score the training images."""
    data, first, _ = families
    only_train = tmp_path / "only"
    shutil.copytree(data / "train", only_train / "Training")
    assert main(["eval", "--family", str(first), "--data", f"pets={only_train}"]) == 2
    err = capsys.readouterr().err
    assert (
        "has a Training/ split but no test/ or val/ one" in err and f"pass {only_train / 'Training'}" in err
    )
    shutil.copytree(data / "test", only_train / "Valid")
    assert main(["eval", "--family", str(first), "--data", f"pets={only_train}"]) == 0
    assert f"{only_train} (Valid)" in capsys.readouterr().out  # the split it scored, as named on disk
