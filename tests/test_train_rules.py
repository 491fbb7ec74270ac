"""What `train_domain` promises its caller: one rule for existing domains, the caller's RNG and
thread count untouched, trackers that log or fail before training, a fresh autocast every call."""

from __future__ import annotations

import pytest
import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from train_support import SIZE, Toy, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)

from adapterkit import AdapterConfig
from adapterkit.train import make_accelerator, train_domain


def _head(model, domain="d"):
    return {k: v.clone() for k, v in model.domain_state_dict(domain).items() if k.startswith("head.")}


def test_an_existing_domain_needs_resume_or_overwrite():
    model = make_model()
    train_domain(model, "d", Toy(8, 3), config=cfg(steps=1), data_config=SIZE)
    before = {k: v.clone() for k, v in model.domain_state_dict("d").items()}
    with pytest.raises(ValueError, match=r"already has domain 'd'.*resume=True.*overwrite=True"):
        train_domain(model, "d", Toy(8, 3), config=cfg(steps=1), data_config=SIZE)
    assert all(torch.equal(v, before[k]) for k, v in model.domain_state_dict("d").items())
    with pytest.raises(ValueError, match="at least 2"):  # checked before the old domain is removed
        train_domain(model, "d", Toy(8, 1), config=cfg(steps=1), overwrite=True, data_config=SIZE)
    assert all(torch.equal(v, before[k]) for k, v in model.domain_state_dict("d").items())


def test_resume_continues_the_domain_and_overwrite_starts_afresh():
    model = make_model()
    train_domain(model, "d", Toy(8, 3), config=cfg(steps=1), data_config=SIZE)
    with torch.no_grad():
        for p in model.heads["d"].parameters():
            p.add_(1.0)  # far from any initialisation
    moved = _head(model)
    tiny = cfg(steps=1, lr=1e-9, weight_decay=0.0)
    train_domain(model, "d", Toy(8, 3), config=tiny, resume=True, data_config=SIZE)
    for key, value in _head(model).items():  # trained on from its current tensors
        torch.testing.assert_close(value, moved[key], atol=1e-6, rtol=0)
    train_domain(model, "d", Toy(8, 5), config=tiny, overwrite=True, data_config=SIZE)
    assert model.domain_info("d").num_classes == 5  # a fresh domain: classes from the new data
    fresh = make_model()
    train_domain(fresh, "d", Toy(8, 5), config=tiny, data_config=SIZE)
    for key, value in _head(fresh).items():  # the same initialisation as a first training
        torch.testing.assert_close(_head(model)[key], value)


def test_the_callers_rng_is_untouched_and_the_head_comes_from_the_config_seed():
    heads = []
    for caller_seed in (1, 2):
        model = make_model(config=AdapterConfig(dropout=0.2))  # dropout draws from the RNG
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        train_domain(model, "d", Toy(8, 3), config=cfg(steps=2, seed=5), data_config=SIZE)
        assert torch.equal(torch.get_rng_state(), before), "train_domain changed the caller's RNG state"
        heads.append(_head(model))
    for key, value in heads[0].items():
        assert torch.equal(heads[1][key], value), f"{key} depends on the caller's RNG"


def test_threads_apply_while_training_and_are_restored(capsys):
    seen = []
    torch.set_num_threads(1)
    config = cfg(steps=2, threads=2, progress=True)
    train_domain(
        make_model(),
        "d",
        Toy(8, 3),
        config=config,
        data_config=SIZE,
        callback=lambda _: seen.append(torch.get_num_threads()),
    )
    assert seen == [2, 2] and torch.get_num_threads() == 1
    assert "d (2 threads)" in capsys.readouterr().err  # the progress bar shows the count
    with pytest.raises(ValueError, match="threads=0 must be a positive int"):
        cfg(threads=0)


def test_a_tracker_without_its_package_fails_before_training(tmp_path):
    available = {str(t) for t in get_available_trackers()}
    absent = [name for name in LoggerType.list() if name != "all" and name not in available]
    if not absent:
        pytest.skip("every tracker accelerate knows is installed")
    model, out = make_model(), tmp_path / "out"
    with pytest.raises(
        ValueError, match=rf"needs {absent[0]}, which is not installed.*pip install {absent[0]}"
    ):
        train_domain(
            model, "d", Toy(8, 3), config=cfg(log_with=absent[0], output_dir=str(out)), data_config=SIZE
        )
    assert model.domains == [] and not out.exists()
    with pytest.raises(ValueError, match="is not a tracker"):
        make_accelerator(cfg(log_with="tensorbored", output_dir=str(out)))


def test_every_domain_trains_under_the_autocast_it_asks_for():
    """accelerate marks a prepared model and skips it next time: `fit` prepares a fresh wrapper instead."""
    model = make_model()
    dtypes = []

    def heads(m, i, o):  # every domain's head is a plain Linear (the adapted convs may run folded)
        if isinstance(m, torch.nn.Linear) and torch.is_grad_enabled():
            dtypes.append(o.dtype)

    config = cfg(steps=1, mixed_precision="bf16")
    acc = make_accelerator(config)
    hook = torch.nn.modules.module.register_module_forward_hook(heads)
    try:
        for domain in ("a", "b"):
            dtypes.clear()
            train_domain(model, domain, Toy(8, 3), config=config, data_config=SIZE, accelerator=acc)
            assert set(dtypes) == {torch.bfloat16}, f"domain {domain} trained in {set(dtypes)}"
    finally:
        hook.remove()
    assert not {"forward", "_original_forward", "_is_accelerate_prepared"} & set(model.__dict__)
