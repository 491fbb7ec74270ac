"""`TrainConfig(grad_checkpointing=True)`: the backbone recomputes its activations in backward, and the trained
domain is the one plain training gives (gradients, tensors, BatchNorm statistics), old domains untouched."""

from __future__ import annotations

import contextlib
import threading

import pytest
import timm
import torch
from checks import perturb
from cli_support import TRAIN, image_folder
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_support import SIZE, Toy, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)

import adapterkit.backbones  # noqa: F401  (registers cifar_resnet20)
from adapterkit import AdapterConfig, AdapterModel
from adapterkit.cli import main
from adapterkit.train import TrainConfig, train_domain, train_model


@contextlib.contextmanager
def recorded_gradients():
    """Every optimizer step's gradients (a list per step, in parameter order), as the optimizer sees them."""
    steps: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        steps.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])

    hook = register_optimizer_step_pre_hook(record)
    try:
        yield steps
    finally:
        hook.remove()


def counted_blocks(model: AdapterModel) -> list[int]:
    """A counter of the training-mode forward calls of the backbone's first block (checkpointed: called
    again in backward when it is recomputed)."""
    calls = [0]
    modules = dict(model.backbone.named_modules())
    block = modules.get("layer1.0") or modules["blocks.0"]

    def count(module, args):
        calls[0] += module.training

    block.register_forward_pre_hook(count)
    return calls


def train_with(name: str, checkpointing: bool, config: AdapterConfig | None = None, **options):
    """A model with a trained-looking domain `old`, then `new` trained for 3 steps: the model, `old`'s
    logits before, every step's gradients and the training-mode forward calls of one block."""
    model = make_model(name, config)
    model.add_domain("old", num_classes=3, data_config=None)
    perturb(model, "old")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        old_logits = model.eval()(x, domain="old")
    calls = counted_blocks(model)
    config = cfg(steps=3, grad_checkpointing=checkpointing, **options)
    with recorded_gradients() as grads:
        train_domain(model, "new", Toy(12, 4), config=config, data_config=SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, domain="old"), old_logits), "the old domain changed"
    return model, grads, calls[0]


def assert_same_training(a, b, rtol: float = 1e-5) -> None:
    (model_a, grads_a, _), (model_b, grads_b, _) = a, b
    assert len(grads_a) == len(grads_b) == 3
    for step_a, step_b in zip(grads_a, grads_b, strict=True):
        for ga, gb in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=1e-7)
    trained_a, trained_b = model_a.domain_state_dict("new"), model_b.domain_state_dict("new")
    for key, t in trained_a.items():
        if "running_" in key or "num_batches_tracked" in key:  # updated once per step, as without
            assert torch.equal(t, trained_b[key]), key
        else:
            torch.testing.assert_close(t, trained_b[key], rtol=rtol, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "cifar_resnet20"])
def test_checkpointed_training_trains_the_same_domain(name):
    """Gradients of every step, the trained tensors and the running statistics match plain training; the
    blocks really ran again in backward, the backbone's setting is back, the old domain is bit-identical."""
    plain = train_with(name, False)
    checkpointed = train_with(name, True)
    assert_same_training(checkpointed, plain)
    assert plain[2] == 3 and checkpointed[2] == 6  # one recomputation per step
    statistics = [k for k in checkpointed[0].domain_state_dict("new") if "running_mean" in k]
    assert bool(statistics) == (name != "test_vit")  # compared exactly above
    backbone = checkpointed[0].backbone
    assert backbone.grad_checkpointing is False


def test_dropout_bf16_autocast_and_accumulation_hold_in_the_recomputation():
    """The recomputed forward draws the adapters' dropout masks the forward drew and runs under the same
    autocast (torch's checkpoint keeps the RNG state and the autocast state); with gradient accumulation
    every micro-batch's statistics update counts once."""
    config = AdapterConfig(dropout=0.3)
    options = dict(mixed_precision="bf16", grad_accum=2)
    plain = train_with("test_resnet", False, config, **options)
    checkpointed = train_with("test_resnet", True, config, **options)
    assert_same_training(checkpointed, plain)


def test_the_backbone_setting_is_restored_after_a_failure_and_a_previous_one_kept():
    model = make_model()
    model.backbone.set_grad_checkpointing(True)  # the caller's own setting survives a training
    train_domain(model, "a", Toy(8, 4), config=cfg(steps=1, grad_checkpointing=True), data_config=SIZE)
    assert model.backbone.grad_checkpointing is True
    model.backbone.set_grad_checkpointing(False)

    def stop(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        config = cfg(steps=2, grad_checkpointing=True)
        train_domain(model, "b", Toy(8, 4), config=config, data_config=SIZE, callback=stop)
    assert model.backbone.grad_checkpointing is False and "b" not in model.domains
    assert model.router.domain is None  # nothing held after the interrupted backward


def test_a_backbone_without_checkpointing_is_refused_before_anything_changes():
    model = AdapterModel.from_backbone(timm.create_model("dla46x_c"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = cfg(steps=1, grad_checkpointing=True)
    with pytest.raises(ValueError, match=r"backbone dla46x_c .*train without grad_checkpointing=True"):
        train_domain(model, "a", Toy(8, 4), config=config, data_config=SIZE)
    assert model.domains == [] and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "grad_checkpointing" not in vars(model.backbone)


def test_full_fine_tuning_keeps_its_batchnorm_statistics_exact():
    """`train_model` (every weight, BatchNorm statistics included) recomputes without a second update."""
    trained = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=4)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
        train_model(model, Toy(8, 4), config=cfg(steps=2, grad_checkpointing=checkpointing))
        trained[checkpointing] = model.state_dict()
        assert model.grad_checkpointing is False
    for key, t in trained[True].items():
        if "running_" in key or "num_batches_tracked" in key:
            assert torch.equal(t, trained[False][key]), key
        else:
            torch.testing.assert_close(t, trained[False][key], rtol=1e-5, atol=1e-7, msg=key)


def test_config_flag_and_cli(tmp_path, capsys):
    """It does not change the trained numbers, so a resume may switch it; the CLI flag trains with it and
    the refusal names the flag."""
    assert "grad_checkpointing" not in TrainConfig(grad_checkpointing=True).trajectory()
    with pytest.raises(ValueError, match="grad_checkpointing"):
        TrainConfig(grad_checkpointing="yes")
    data = image_folder(tmp_path / "data", splits=(("train", 2),))
    args = ["--domain", "pets", "--data", str(data), "--steps", "1", "--grad-checkpointing", *TRAIN]
    family = tmp_path / "family"
    assert main(["train", "--family", str(family), "--backbone", "test_resnet", "--random-init", *args]) == 0
    assert AdapterModel.from_pretrained(family).domains == ["pets"]
    capsys.readouterr()
    refused = ["train", "--family", str(tmp_path / "dla"), "--backbone", "dla46x_c", "--random-init", *args]
    assert main(refused) == 2
    assert "train without --grad-checkpointing" in capsys.readouterr().err
    assert not (tmp_path / "dla").exists()


def test_the_held_domain_reaches_a_backward_in_another_thread():
    """On a GPU autograd runs a backward (and so the recomputation) in its own thread: the domain the
    backward holds reaches threads that set no domain, and not those that chose one (None included)."""
    model = make_model()
    model.add_domain("a", num_classes=3)
    perturb(model, "a")
    model.set_trainable("a")
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    grads = {}
    for checkpointing in (False, True):
        model.backbone.set_grad_checkpointing(checkpointing)
        loss = torch.nn.functional.cross_entropy(model.train()(x, domain="a"), y)
        with model.router.hold("a"):
            seen: list = []

            def backward(loss=loss, seen=seen):
                seen.append(model.router.domain)
                loss.backward()

            worker = threading.Thread(target=backward)
            worker.start()
            worker.join()
            with model.router.use(None):
                assert model.router.domain is None  # the plain backbone, chosen
        assert seen == ["a"] and model.router.domain is None
        grads[checkpointing] = [p.grad.clone() for p in model.trainable_parameters("a")]
        model.zero_grad(set_to_none=True)
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
