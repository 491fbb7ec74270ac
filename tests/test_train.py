"""Training one domain: only its tensors change, exact resume, data checks, optimizer/precision options."""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from checks import perturb
from PIL import Image
from train_support import SIZE, Toy, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)
from train_support import image_folder as _image_folder

from adapterkit import AdapterConfig
from adapterkit.data import DomainDataset, open_data
from adapterkit.layers import AdaptedConv2d
from adapterkit.train import TrainConfig, auto_weight_decay, evaluate, learning_rate, train_domain
from adapterkit.transforms import Preprocess


def with_an_old_domain():
    """A model with a trained-looking domain `old`, an input batch and `old`'s logits on it."""
    model = make_model()
    model.add_domain("old", num_classes=3, data_config=None)
    perturb(model, "old")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model.eval()(x, domain="old")


def test_one_step_changes_only_the_active_domain():
    model, x, old_logits = with_an_old_domain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_domain(model, "new", Toy(8, 4), config=cfg(steps=1), data_config=SIZE)
    after = model.state_dict()
    # the trained domain comes back frozen: its tensors packed in one buffer per layer (`adapters.new`)
    new_keys = {
        k for k in after if k.endswith(".adapters.new") or k.startswith(("heads.new.", "signatures.new."))
    }
    assert set(before) == set(after) - new_keys
    for (
        key,
        value,
    ) in before.items():  # backbone weights, its BN statistics, the old domain: all bit-identical
        assert torch.equal(after[key], value), f"{key} changed while training domain 'new'"
    fresh = make_model()
    fresh.add_domain("new", num_classes=4)
    trained, initial = model.domain_state_dict("new"), fresh.domain_state_dict("new")
    changed = [k for k in initial if not torch.equal(trained[k], initial[k])]
    assert any("running_mean" in k for k in changed) and any(k.startswith("head.") for k in changed)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, domain="old"), old_logits)
    assert all(p.requires_grad for p in model.trainable_parameters("old"))  # flags restored


@pytest.mark.parametrize(
    "options",
    [dict(), dict(optimizer="adamw", lr=0.01, grad_accum=2, schedule="step", warmup_steps=2)],
    ids=["sgd", "adamw-accum"],
)
def test_resume_reproduces_an_uninterrupted_run(tmp_path, options):
    config = AdapterConfig(dropout=0.2)  # dropout draws from the RNG: the checkpoint must restore it
    train, test = Toy(24, 3), Toy(8, 3, seed=1)
    run = cfg(epochs=3, checkpoint_every=4, output_dir=str(tmp_path / "a"), **options)
    reference = make_model(config=config)
    ref_metrics = train_domain(reference, "d", train, test, run, data_config=SIZE)

    class Crash(Exception):
        pass

    crash_at = 5 if options else 9  # mid-epoch, one step after a checkpoint

    def crash(info):
        if info["step"] == crash_at:
            raise Crash

    out = tmp_path / "b"
    model = make_model(config=config)
    with pytest.raises(Crash):
        train_domain(
            model,
            "d",
            train,
            test,
            cfg(**{**run.to_dict(), "output_dir": str(out)}),
            callback=crash,
            data_config=SIZE,
        )
    files = sorted(p.name for p in (out / "checkpoints" / "d").iterdir())
    assert files[0] == "checkpoint.json" and files[1].endswith(".safetensors") and len(files) == 2
    resumed = make_model(config=config)  # a fresh process: new model, same backbone
    steps = []
    metrics = train_domain(
        resumed,
        "d",
        train,
        test,
        cfg(**{**run.to_dict(), "output_dir": str(out)}),
        resume=True,
        data_config=SIZE,
        callback=lambda info: steps.append(info["step"]),
    )
    assert steps[0] == crash_at  # it did resume from the checkpoint one step before the crash
    for key, value in reference.domain_state_dict("d").items():
        assert torch.equal(resumed.domain_state_dict("d")[key], value), f"{key} differs after resume"
    assert (
        metrics["accuracy"] == ref_metrics["accuracy"] and metrics["train_loss"] == ref_metrics["train_loss"]
    )
    assert not (out / "checkpoints" / "d" / "checkpoint.json").exists()  # removed once the domain is done


def test_resume_refuses_changed_settings(tmp_path):
    run = cfg(epochs=2, checkpoint_every=2, output_dir=str(tmp_path))

    def stop(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_domain(make_model(), "d", Toy(16, 3), config=run, callback=stop, data_config=SIZE)
    changed = cfg(**{**run.to_dict(), "lr": 0.5})
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train_domain(make_model(), "d", Toy(16, 3), config=changed, resume=True, data_config=SIZE)


def _hf(labels):
    images = [Image.new("RGB", (16, 16), (i * 20 % 255, 0, 0)) for i in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _flat_folder(root):
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (10 * i, 50, 200)).save(root / f"{i}.png")
    return root


def _bad_folder(tmp_path, kind):
    root = _image_folder(tmp_path / "data", modes=("L",) if kind == "grey" else ("RGB",))
    if kind == "undecodable":
        (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.mark.parametrize(
    "kind, data, extra, match",
    [
        (
            "label",
            lambda p: _hf([0, 1, 2, 5, 1, 0, 2, 1]),
            dict(num_classes=3),
            r"outside 0\.\.2.*num_classes=6",
        ),
        ("empty", lambda p: Toy(0, 3), dict(num_classes=3), "is empty"),
        (
            "one class",
            lambda p: _image_folder(p / "data", classes=("a",)),
            {},
            r"1 class \('a'\).*at least 2",
        ),
        (
            "no class folders",
            lambda p: _flat_folder(p / "data"),
            {},
            r"holds 4 images but no class subfolders",
        ),
        ("undecodable", lambda p: _bad_folder(p, "undecodable"), {}, r"broken\.png.*cannot be decoded"),
        ("grey", lambda p: _bad_folder(p, "grey"), {}, r"grey \(L\).*expects RGB.*convert"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, kind, data, extra, match):
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    out = tmp_path / "out"
    config = cfg(epochs=1, checkpoint_every=1, output_dir=str(out), grayscale="error")
    with pytest.raises(ValueError, match=match):
        train_domain(model, "d", data(tmp_path), config=config, data_config=SIZE, **extra)
    assert model.domains == [] and not out.exists()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_undecodable_image_outside_the_checked_sample_stops_with_a_clear_error(tmp_path):
    root = _bad_folder(tmp_path, "undecodable")
    config = cfg(epochs=1, batch_size=7, check_images=1)
    with pytest.raises(ValueError, match=r"broken\.png.*cannot be used.*Remove or replace it"):
        train_domain(make_model(), "d", root, config=config, data_config=SIZE)


def test_grey_images_are_converted_and_sources_agree(tmp_path):
    model = make_model()
    root = _image_folder(tmp_path / "grey", modes=("L", "RGB"))
    metrics = train_domain(model, "mixed", root, root, cfg(epochs=1), data_config=SIZE)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and model.domain_info("mixed").labels == ["a", "b"]
    grey = Toy(8, 2, channels=1)  # (1, H, W) tensors from a torch dataset
    rgb = Toy(8, 2, channels=1)
    rgb.x = rgb.x.expand(-1, 3, -1, -1).clone()  # the same images with the grey channel copied to 3
    pre = Preprocess(model.domain_info("mixed").data_config)
    a, b = (torch.stack([x for x, _ in DomainDataset(open_data(d), pre)]) for d in (grey, rgb))
    assert a.shape[1] == 3 and torch.equal(a, b)
    assert evaluate(model, grey, "mixed") == evaluate(model, rgb, "mixed")
    hf = _hf([0, 1] * 4)
    assert isinstance(evaluate(model, hf, "mixed"), float)


def test_adamw_cosine_accumulation_bf16_tensorboard_smoke(tmp_path):
    model = make_model("test_vit")
    config = cfg(steps=3, optimizer="adamw", lr=1e-3, grad_accum=2, mixed_precision="bf16", max_grad_norm=1.0)
    config = cfg(
        **{**config.to_dict(), "log_with": "tensorboard", "log_every": 1, "output_dir": str(tmp_path)}
    )
    metrics = train_domain(model, "d", Toy(24, 3), Toy(8, 3, 1), config, data_config=SIZE)
    assert metrics["steps"] == 3 and np.isfinite(metrics["train_loss"])
    assert "forward" not in model.__dict__  # the autocast wrapper is removed after training
    assert list(tmp_path.rglob("events.out.tfevents*"))


def test_accumulation_equals_the_larger_batch():
    """Without BatchNorm, 2 x 4 accumulated images give the step of one batch of 8 (up to summation order)."""
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        model = make_model("test_vit")
        train_domain(
            model, "d", Toy(32, 3), config=cfg(steps=3, batch_size=batch, grad_accum=accum), data_config=SIZE
        )
        results.append(model.domain_state_dict("d"))
        AcceleratorState._reset_state(reset_partial_state=True)
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-6)


def test_config_validation_and_schedules():
    with pytest.raises(ValueError, match="epochs or steps"):
        TrainConfig(epochs=2, steps=10)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay="big")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="needs output_dir"):
        TrainConfig(log_with="tensorboard")
    assert (auto_weight_decay(9_999), auto_weight_decay(10_000), auto_weight_decay(100_000)) == (
        0.002,
        0.0005,
        0.0001,
    )
    cosine = TrainConfig(lr=1.0, warmup_steps=2)
    assert [round(learning_rate(cosine, s, 10), 4) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    step = TrainConfig(lr=1.0, schedule="step", milestones=(0.5,), gamma=0.1)
    assert learning_rate(step, 4, 10) == 1.0 and learning_rate(step, 5, 10) == pytest.approx(0.1)


@pytest.mark.parametrize("option", [True, "auto"])
def test_channels_last_training_matches_and_leaves_the_backbone_as_it_was(option):
    """On CPU, `channels_last` ("auto" there) trains on NHWC maps: the same domain as contiguous training
    to float rounding, and afterwards the backbone's tensors have their old layout and the old domain its
    bit-identical logits."""
    trained, layouts = {}, []
    for setting in (option, False):
        model, x, old_logits = with_an_old_domain()
        strides = {k: v.stride() for k, v in model.backbone.state_dict().items()}
        conv = next(m for m in model.backbone.modules() if isinstance(m, AdaptedConv2d))

        def record(module, args, setting=setting):
            if module.training:
                layouts.append((setting, args[0].is_contiguous(memory_format=torch.channels_last)))

        hook = conv.register_forward_pre_hook(record)
        train_domain(model, "new", Toy(8, 4), config=cfg(steps=2, channels_last=setting), data_config=SIZE)
        hook.remove()
        after = model.backbone.state_dict()
        assert {k: after[k].stride() for k in strides} == strides
        with torch.no_grad():
            assert torch.equal(model.eval()(x, domain="old"), old_logits)
        trained[setting] = model.domain_state_dict("new")
    assert {cl for s, cl in layouts if s == option} == {True}  # every training forward ran NHWC
    assert {cl for s, cl in layouts if s is False} == {False}
    for key, t in trained[option].items():
        assert torch.allclose(t.float(), trained[False][key].float(), rtol=1e-4, atol=1e-5), key
    with pytest.raises(ValueError, match="channels_last"):
        TrainConfig(channels_last="yes")
