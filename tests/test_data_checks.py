"""Checks before training that report every problem at once, named, with the fix."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from train_support import SIZE, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)
from train_support import image_folder as _image_folder

from adapterkit.data import open_splits
from adapterkit.data_checks import SHOW_FAILURES
from adapterkit.train import evaluate, train_domain


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


def _tensors(labels, n=8):
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(torch.rand(n, 3, 32, 32), labels)


@pytest.mark.parametrize("names", [("train", "test"), ("Train", "Test"), ("training", "testing")])
def test_a_folder_of_splits_is_not_read_as_classes(tmp_path, names):
    train, test = names
    _image_folder(tmp_path / "data" / train)
    _image_folder(tmp_path / "data" / test)
    model = make_model()
    with pytest.raises(ValueError, match=rf"holds the splits .*not classes: pass one split .*data/{train}'"):
        train_domain(model, "d", tmp_path / "data", config=cfg(steps=1), data_config=SIZE)
    assert set(open_splits(tmp_path / "data")) == {"train", "test"}
    assert model.domains == []
    train_domain(
        model, "d", tmp_path / "data" / train, tmp_path / "data" / test, cfg(steps=1), data_config=SIZE
    )
    assert model.domain_info("d").labels == ["a", "b"]


def test_evaluation_data_is_matched_to_the_domain_by_class_name(tmp_path):
    """A test folder without one of the domain's classes keeps every image's true class (by position, the
    classes after the missing one would each take the previous one's label); unknown names are refused."""
    model = make_model()
    model.add_domain("d", labels=["a", "b", "c"], data_config=SIZE)
    with torch.no_grad():
        model.heads["d"].bias.copy_(torch.tensor([0.0, 0.0, 1e4]))  # always answers "c"
    model.set_trainable("d", False)
    missing_a = _image_folder(tmp_path / "bc", classes=("b", "c"))  # 3 images of each
    assert evaluate(model, missing_a, "d", config=cfg()) == 0.5  # the "c" images, by name (0 by position)
    assert evaluate(model, _image_folder(tmp_path / "c", classes=("c",)), "d", config=cfg()) == 1.0
    with pytest.raises(
        ValueError, match=r"classes \['x'\] are not classes of the domain \(\['a', 'b', 'c'\]"
    ):
        evaluate(model, _image_folder(tmp_path / "bx", classes=("b", "x")), "d", config=cfg())
    train_domain(model, "e", tmp_path / "bc", missing_a, cfg(steps=1), data_config=SIZE)  # same names: as is
    assert model.domain_info("e").labels == ["b", "c"]
    with pytest.raises(ValueError, match=r"training data: classes \['x'\].*train a fresh domain.*overwrite"):
        train_domain(model, "e", tmp_path / "bx", config=cfg(steps=1), resume=True)  # (not "evaluate")


@pytest.mark.parametrize(
    "labels, message",
    [
        ("one-hot", r"labels have shape \(2,\) per item, not one class index.*argmax"),
        ("names", r"labels are 'cat'-like names, not class indices.*labels=.*class_encode_column"),
        ("negative", r"item 0 of the training data has label -1: class indices start at 0"),
    ],
)
def test_labels_that_are_not_class_indices_are_named_with_the_fix(labels, message):
    import torch
    from torch.utils.data import Dataset

    class Named(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(3, 32, 32), ["cat", "dog"][i % 2]

    data = {
        "one-hot": lambda: _tensors(torch.nn.functional.one_hot(torch.arange(8) % 2, 2)),
        "names": Named,
        "negative": lambda: _tensors(torch.arange(8) % 3 - 1),
    }[labels]()
    model = make_model()
    with pytest.raises(ValueError, match=message):
        train_domain(model, "d", data, config=cfg(steps=1), num_classes=2, data_config=SIZE)
    assert model.domains == []


def test_a_failed_training_leaves_the_domain_as_it_was(tmp_path):
    import torch
    from torch.utils.data import Dataset

    class Fails(Dataset):  # passes the checks (8 images read), fails in training
        calls = 0

        def __len__(self):
            return 64

        def __getitem__(self, i):
            self.calls += 1
            if self.calls > 8:
                raise OSError(f"disk error reading item {i}")
            return torch.rand(3, 32, 32), i % 2

        targets = [i % 2 for i in range(64)]

    model = make_model()
    with pytest.raises(ValueError, match="cannot be used: disk error"):
        train_domain(model, "d", Fails(), config=cfg(steps=4, check_images=8), data_config=SIZE)
    assert model.domains == []  # a new domain is not left half-trained
    train_domain(model, "d", _tensors(torch.arange(8) % 2), config=cfg(steps=2), data_config=SIZE)
    assert not model.is_trainable("d")  # returned frozen, as a loaded domain
    before = {k: t.clone() for k, t in model.domain_state_dict("d").items()}
    info = model.domain_info("d")
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(ValueError, match="cannot be used: disk error"):
            train_domain(model, "d", Fails(), config=cfg(steps=4, check_images=8), data_config=SIZE, **kwargs)
        after = model.domain_state_dict("d")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert model.domain_info("d") == info and not model.is_trainable("d")
    model.train()
    with torch.no_grad():  # a train-mode call does not move a trained domain's norm statistics
        model(torch.rand(4, 3, 32, 32), domain="d")
    assert all(torch.equal(before[k], t) for k, t in model.domain_state_dict("d").items())


@pytest.mark.parametrize(
    "images, message",
    [
        (
            lambda t: t * 255,
            r"item 0 of the training data: float pixel values in \[0, 2\d\d\], not 0..1.*Normalize",
        ),
        (lambda t: (t - 0.5) / 0.25, r"float pixel values in \[-2, 2\], not 0..1: pass raw images"),
        (lambda t: t.permute(0, 2, 3, 1), r"shape \(32, 32, 3\) is \(H, W, C\).*permute\(2, 0, 1\)"),
        (lambda t: t.unsqueeze(1), r"shape \(1, 3, 32, 32\) is not one image"),
        (lambda t: t.where(t > 0.01, float("nan")), r"NaN or infinite"),
    ],
)
def test_images_in_a_form_adapterkit_does_not_read_are_named_with_the_fix(images, message):
    import torch
    from torch.utils.data import TensorDataset

    x = torch.rand(8, 3, 32, 32).clamp(0.02, 1.0)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # the whole range: normalised, it reaches -2 and 2
    model = make_model()
    with pytest.raises(ValueError, match=message):
        train_domain(
            model, "d", TensorDataset(images(x), torch.arange(8) % 2), config=cfg(steps=1), data_config=SIZE
        )
    assert model.domains == []


def test_a_list_or_a_data_loader_is_refused_with_what_to_pass_instead():
    import torch
    from torch.utils.data import DataLoader

    data = _tensors(torch.arange(8) % 2)
    for given, hint in (
        (DataLoader(data), r"pass loader\.dataset"),
        (list(data), r"TensorDataset\(images, labels\)"),
    ):
        with pytest.raises(TypeError, match=hint):
            train_domain(make_model(), "d", given, config=cfg(steps=1), data_config=SIZE)


def test_labels_given_for_differently_named_folders_are_read_by_position(tmp_path):
    """train_domain(labels=...) names the classes of folders called n01/, n02/: later evaluation and a
    resumed training on the same folders read them by position, as training did."""
    model = make_model()
    folder = _image_folder(tmp_path / "n", classes=("n01", "n02"))
    train_domain(model, "d", folder, config=cfg(steps=1), labels=["tench", "goldfish"], data_config=SIZE)
    assert model.domain_info("d").labels == ["tench", "goldfish"]
    assert 0.0 <= evaluate(model, folder, "d", config=cfg()) <= 1.0
    train_domain(model, "d", folder, config=cfg(steps=1), resume=True, data_config=SIZE)


def test_labels_outside_the_named_classes_are_refused_not_wrapped(tmp_path):
    """An unlabelled item (-1) of data matched by name must not be read as the last class."""
    import datasets
    import numpy as np

    model = make_model()
    model.add_domain("d", labels=["a", "b", "c"], data_config=SIZE)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["c", "a"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, -1, 1]}, features=features)
    with pytest.raises(ValueError, match=r"label -1 is not one of the data's 2 named classes"):
        evaluate(model, ds, "d", config=cfg())


def test_split_folders_are_splits_only_when_every_folder_is_one(tmp_path):
    for name in ("Bus", "Car", "Train"):  # a class named Train
        _image_folder(tmp_path / "vehicles", classes=(name,))
    assert set(open_splits(tmp_path / "vehicles")) == {"train"}  # the whole folder: three classes
    assert open_splits(tmp_path / "vehicles")["train"].class_names == ["Bus", "Car", "Train"]
    _image_folder(tmp_path / "held" / "Valid")
    assert set(open_splits(tmp_path / "held")) == {"val"}  # a folder with only a validation split


def test_data_configs_are_bounded_and_timm_configs_pass(tmp_path):
    """A data config is refused when its input or its resize before the crop passes MAX_INPUT_SIZE; every
    pretrained config timm ships passes (volo's crop_pct is 1.15)."""
    import timm

    from adapterkit.transforms import MAX_INPUT_SIZE, resolve_data_config

    for overrides in (
        {"input_size": 224, "crop_pct": 0.01},
        {"input_size": MAX_INPUT_SIZE + 1},
        {"crop_pct": 3},
    ):
        with pytest.raises(ValueError, match="MAX_INPUT_SIZE|px|crop_pct"):
            resolve_data_config({"input_size": (3, 224, 224)}, overrides)
    failed = []
    for name in timm.list_pretrained():
        try:
            resolve_data_config(timm.models.get_pretrained_cfg(name).to_dict())
        except ValueError as e:
            failed.append(f"{name}: {e}")
    assert failed == []


def test_a_thin_image_is_resized_only_where_the_crop_reads(tmp_path):
    """An 8000 x 1 image once grew to a 2 million px wide resize before the crop; now only the crop's region
    is resampled, the same pixels as the full resize gives."""
    import numpy as np

    from adapterkit.transforms import _resize_crop

    bicubic = Image.Resampling.BICUBIC
    assert _resize_crop(Image.new("RGB", (8000, 1)), (224, 224), 0.875, "center", bicubic).size == (224, 224)
    thin = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 1000, 3), dtype=np.uint8))
    full = thin.resize((2560, 256), bicubic)  # the shorter side to 224 / 0.875 = 256, then the centre crop
    expected = np.asarray(full.crop((1168, 16, 1392, 240)))
    assert np.array_equal(np.asarray(_resize_crop(thin, (224, 224), 0.875, "center", bicubic)), expected)


@pytest.mark.parametrize("size", [(224, 224), (224, 448), (448, 224)])
def test_a_thin_image_stays_small_in_memory_for_any_input_shape(size):
    """The guard once held only for square inputs: an 8000 x 1 image for a (224, 448) input grew to a
    2,048,000 x 256 resize (1.5 GB) before the crop."""
    code = (
        "import resource; from PIL import Image; from adapterkit.transforms import _resize_crop; "
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024; before = peak(); "
        f"out = _resize_crop(Image.new('RGB', (8000, 1)), {size}, 0.875, 'center', Image.Resampling.BICUBIC); "
        "print(out.size[1], out.size[0], peak() - before)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    h, w, grown_mib = map(int, done.stdout.split())
    assert (h, w) == size and grown_mib < 100, done.stdout  # the full resize: 1.5 GB


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_eval_preprocessing_is_timms_for_every_crop_mode(mode):
    """`crop_mode="border"` (some timm pretrained configs) was preprocessed as `center`, cutting the
    image's long side instead of padding around it; each mode now gives timm's own eval transform's
    tensor on a real photo: portrait, landscape, upscaled, square and non-square inputs."""
    import numpy as np
    import timm.data
    from matplotlib import cbook

    from adapterkit.transforms import Preprocess, resolve_data_config

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        photo = photo.convert("RGB")
    images = [
        photo,
        photo.transpose(Image.Transpose.ROTATE_90),
        photo.resize((37, 61)),
        photo.crop((0, 0, 512, 300)),
    ]
    for size, crop_pct, interpolation in (((3, 224, 224), 0.875, "bicubic"), ((3, 96, 128), 1.0, "bilinear")):
        overrides = {
            "input_size": size,
            "crop_pct": crop_pct,
            "crop_mode": mode,
            "interpolation": interpolation,
        }
        config = resolve_data_config({"num_classes": 10}, overrides)
        ours = Preprocess(config)
        theirs = timm.data.create_transform(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        )
        for image in images:
            expected = theirs(image)
            assert expected.shape == ours(image).shape == size
            assert torch.allclose(ours(image), expected, atol=1e-6), (mode, size, image.size)
    if mode == "border":  # the padding is the mean colour: 0 after normalisation, the photo is all there
        x = Preprocess(
            resolve_data_config(
                {"num_classes": 10}, {"input_size": (3, 64, 64), "crop_mode": mode, "crop_pct": 1.0}
            )
        )(images[3])
        assert np.allclose(x[:, :4].numpy(), 0, atol=0.02) and not np.allclose(x[:, 30].numpy(), 0, atol=0.02)


def test_a_datasetdict_with_valid_and_validation_is_refused_naming_both(tmp_path, capsys):
    """A saved DatasetDict with `valid` and `validation` splits silently kept the later one as its
    evaluation split; now it is refused (as two such folders are), naming both and how to pick one."""
    import datasets
    import numpy as np

    from adapterkit.cli import main

    rng = np.random.default_rng(0)
    images = [
        datasets.Image().encode_example(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(8)
    ]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 4}, features=features)
    path = tmp_path / "ds"
    datasets.DatasetDict({"train": ds, "valid": ds, "validation": ds.select(range(4))}).save_to_disk(
        str(path)
    )
    with pytest.raises(ValueError, match=r"two val splits, 'valid' and 'validation': pass the one you mean"):
        open_splits(path)
    family = tmp_path / "family"
    args = ["train", "--family", str(family), "--domain", "d", "--backbone", "test_resnet", "--random-init"]
    args += ["--steps", "1", "--batch-size", "4", "--image-size", "32", "--no-progress"]
    assert main([*args, "--data", str(path)]) == 2
    assert f"--eval-data {path / 'validation'}" in capsys.readouterr().err and not family.exists()
    # the fix the message gives: each split as its own folder
    assert main([*args, "--data", str(path / "train"), "--eval-data", str(path / "validation")]) == 0


def test_a_fine_tuned_plain_model_is_evaluated_by_class_name(tmp_path):
    """`train_model` matched its test folder to the training classes by name, but a later `evaluate` of
    the plain model read the classes by position: a test folder without class `a` scored its `c` images
    as class 1. Now both match by name (the names are the model's `pretrained_cfg["label_names"]`)."""
    import timm

    from adapterkit.train import train_model
    from adapterkit.transforms import Preprocess, resolve_data_config

    colours = {"a": (250, 20, 20), "b": (20, 250, 20), "c": (20, 20, 250)}
    for split, names in (("train", "abc"), ("test", "c")):
        for c in names:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), tuple(v + 3 * i for v in colours[c])).save(
                    tmp_path / split / c / f"{i}.png"
                )
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=3)
    metrics = train_model(net, tmp_path / "train", tmp_path / "test", cfg(steps=12), data_config=SIZE)
    pre = Preprocess(resolve_data_config(net.pretrained_cfg, SIZE))
    x = torch.stack([pre(Image.open(p)) for p in sorted((tmp_path / "test" / "c").iterdir())])
    with torch.no_grad():
        predicted = net.eval()(x).argmax(1)
    by_name, by_position = (predicted == 2).float().mean().item(), (predicted == 0).float().mean().item()
    assert by_name != by_position  # the two readings disagree on this model: the test tells them apart
    assert metrics["accuracy"] == pytest.approx(by_name)
    assert evaluate(net, tmp_path / "test", data_config=SIZE) == pytest.approx(by_name)
    assert net.pretrained_cfg["label_names"] == ["a", "b", "c"]
    # the preprocessing it trained with is recorded too: evaluate needs no data_config again
    assert tuple(net.pretrained_cfg["input_size"]) == (3, 32, 32)  # SIZE; test_resnet was trained at 160
    assert evaluate(net, tmp_path / "test") == pytest.approx(by_name)
