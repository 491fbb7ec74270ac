"""`adapterkit predict SOURCE IMAGE...`: the real command answers image files as the inference service
answers the same images over HTTP, routes with `--domain auto`, and names the file or the option at fault."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from cli_support import cli, table
from PIL import Image
from serve_support import build_family, colour_photo, image_bytes, predict_json, running

from adapterkit import AdapterModel
from adapterkit.cli_errors import CliError
from adapterkit.cli_predict import image_files, pick_domain
from adapterkit.serve import create_app
from adapterkit.transforms import Preprocess, resolve_data_config

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("predict") / "fam")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(image_bytes(i))
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    return folder


def test_answers_are_the_services_answers_for_the_same_images(family, photos):
    files = sorted(photos.glob("*.png"))
    done = cli("predict", str(family), *map(str, files), "--domain", "a", "--json", "--top-k", "2")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["image"] for a in answers] == [str(f) for f in files]
    with running(create_app(AdapterModel.from_pretrained(family))) as url, httpx.Client(base_url=url) as c:
        served = predict_json(c, [("a", f.read_bytes()) for f in files], top_k=2).json()["predictions"]
    for answer, want in zip(answers, served, strict=True):
        assert answer["domain"] == "a" and answer["label"] == want["label"] in ("cat", "dog", "eel")
        assert [k["index"] for k in answer["top_k"]] == [k["index"] for k in want["top_k"]]
        assert answer["score"] == pytest.approx(want["score"], rel=1e-5)
    assert "classifying 3 images with 1 domain" in done.stderr  # only the named domain was loaded

    table_run = cli("predict", str(family), str(photos), "--domain", "b")  # a folder: its image files
    assert table_run.returncode == 0, table_run.stderr
    rows = table(table_run.stdout)
    assert rows[0] == ["image", "domain", "label", "score"] and [r[1] for r in rows[1:]] == ["b"] * 3


def test_mixed_precision_answers_as_a_service_with_that_precision(family, photos):
    files = sorted(photos.glob("*.png"))
    done = cli(
        "predict", str(family), *map(str, files), "--domain", "b", "--json", "--mixed-precision", "bf16"
    )
    assert done.returncode == 0, done.stderr
    scores = [json.loads(line)["score"] for line in done.stdout.splitlines()]
    served = {}
    for precision in ("bf16", "no"):
        app = create_app(AdapterModel.from_pretrained(family), mixed_precision=precision)
        with running(app) as url, httpx.Client(base_url=url) as c:
            answers = predict_json(c, [("b", f.read_bytes()) for f in files]).json()["predictions"]
        served[precision] = [a["score"] for a in answers]
    assert served["bf16"] == pytest.approx(scores, rel=1e-6) and served["no"] != pytest.approx(
        scores, rel=1e-6
    )


def test_bad_input_names_the_file_or_the_option(family, photos, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_bytes(0)[:40])  # a truncated PNG
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)  # over --max-pixels 2000 (the photos are 32 x 32)
    images = [str(photos / "img0.png"), str(broken), str(big)]
    done = cli("predict", str(family), *images, "--domain", "a", "--max-pixels", "2000")
    rows = table(done.stdout)[1:]  # every image has its row, the readable one its answer
    assert [r[:2] for r in rows] == [[images[0], "a"], [images[1], "error"], [images[2], "error"]]
    assert (
        rows[1][2].startswith(f"{broken} is not an image")
        and "decoded up to 2000 pixels (--max-pixels)" in rows[2][2]
    )
    error = done.stderr.splitlines()[-1]  # (after the status line)
    assert (
        done.returncode == 2
        and error == "adapterkit predict: error: 2 of 3 images could not be classified (see their rows)"
    )
    unknown = cli("predict", str(family), str(photos / "img0.png"), "--domain", "zebra")
    assert unknown.returncode == 2 and "zebra" in unknown.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(CliError, match="holds no image files"):
        image_files([tmp_path / "empty"])
    (tmp_path / "split" / "class1").mkdir(parents=True)  # a class-folder split: the images at any depth
    (tmp_path / "split" / "class1" / "x.png").write_bytes(image_bytes(0))
    assert image_files([tmp_path / "split"]) == [tmp_path / "split" / "class1" / "x.png"]
    with pytest.raises(CliError, match="does not exist"):
        image_files([tmp_path / "missing.png"])
    with pytest.raises(CliError, match="pass --domain NAME"):
        pick_domain(None, ["a", "b"], routable=False)
    assert pick_domain(None, ["a"], routable=False) == "a" and pick_domain(None, ["a", "b"], True) == "auto"


def test_the_help_says_the_default_domain_pick_domain_chooses():
    """`--help` said "[default: the only domain, else auto]": one routable domain is routed (`auto`)."""
    assert pick_domain(None, ["a"], routable=True) == "auto"
    done = cli("predict", "--help", COLUMNS="200")
    assert "[default: auto when every domain has a signature, else the only domain]" in done.stdout


def test_auto_routes_each_image_and_says_when_it_fits_no_domain(tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    for colour in COLOURS:
        model.add_domain(colour, num_classes=2, data_config={"input_size": 32})
        # the domain's own eval preprocessing, as the service applies it
        preprocess = Preprocess(
            resolve_data_config(model.pretrained_cfg, model.domain_info(colour).data_config)
        )
        x = torch.stack(
            [preprocess(Image.open(io.BytesIO(colour_photo(COLOURS[colour], k)))) for k in range(128)]
        )
        model.fit_signature(colour, x.split(16), budget=None)  # (test_resnet's domains are a few KB)
    model.save_pretrained(tmp_path / "fam")
    for i, colour in enumerate(COLOURS):
        (tmp_path / f"{i}_{colour}.png").write_bytes(colour_photo(COLOURS[colour], 1000 + i))
    board = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(board[:, :, None], 3, axis=2)).save(tmp_path / "2_board.png")
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    done = cli("predict", str(tmp_path / "fam"), *files, "--json")  # two domains with signatures: auto
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["domain"] for a in answers] == ["red", "blue", None]
    assert answers[2]["unknown"] is True and answers[0]["routed"] is True
    shown = cli("predict", str(tmp_path / "fam"), *files)  # the table: score is always a class probability
    row = next(r for r in table(shown.stdout) if r[0].endswith("2_board.png"))
    assert row[1].startswith("unknown (nearest") and row[2].startswith("(routing confidence") and row[3] == ""


def test_predict_and_serve_say_backbone_problems_in_flags(tmp_path, capsys):
    """predict and serve load through `serve_run.load_family`, not the CLI's `open_family`: other backbone
    weights answered the library's "pass force=True", and missing pretrained weights "pass backbone= with the
    timm module"; neither command takes those."""
    from cli_support import weights_file

    from adapterkit.cli import main

    model = AdapterModel.from_backbone("test_resnet", pretrained=weights_file(tmp_path / "a.safetensors"))
    model.add_domain("d", num_classes=2, data_config={"input_size": 32})
    model.save_pretrained(tmp_path / "fam")
    other = weights_file(tmp_path / "b.safetensors", seed=1)
    (tmp_path / "x.png").write_bytes(image_bytes(0))
    weights = ["--backbone-weights", str(other)]
    for args in (
        ["predict", str(tmp_path / "fam"), str(tmp_path / "x.png")],
        ["serve", str(tmp_path / "fam")],
    ):
        assert main([*args, *weights, *(["--port", "0"] if args[0] == "serve" else [])]) == 2
        err = capsys.readouterr().err
        assert "pass --backbone-weights FILE with the weights file the family was trained on" in err
        assert "force" not in err
