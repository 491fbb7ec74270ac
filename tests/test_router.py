"""Routing images whose domain nobody gives (`domain="auto"`, `model.route`): signatures are fitted per
domain and never change when others come and go, separable domains route right, unknown images are
flagged, and signatures travel with the domain's file."""

from __future__ import annotations

import math

import pytest
import torch
from router_support import (
    COLOURS,
    batches,
    colour_model,
    images,
    rewrite_domain_file,
    unknown,
    without_open_calibration,
)

from adapterkit import AdapterModel
from adapterkit.family import save_family
from adapterkit.router import collect_features, open_decisions
from adapterkit.signature import COMPONENTS, MIN_COMPONENTS, OPEN_BUFFERS, PROBS, DomainSignature


@pytest.fixture(scope="module")
def model():
    return colour_model()


def test_separable_domains_route_right_and_auto_uses_the_route(model):
    x = torch.cat([images(c, 8, seed=100 + i) for i, c in enumerate(COLOURS)])
    truth = [c for c in COLOURS for _ in range(8)]
    routed = model.route(x)
    assert routed.best == truth
    flagged = sum(d is None for d in routed.domains)
    assert all(d in (t, None) for d, t in zip(routed.domains, truth, strict=True))
    assert flagged <= 2  # the threshold is calibrated to call ~1 % of a domain's own images unknown
    assert routed.names == list(COLOURS) and routed.scores.shape == (24, 3)
    assert bool((routed.posterior > 0.99).all())  # the posterior saturates; `confidence` does not
    assert bool((routed.margin > 0).all())
    with torch.no_grad():
        assert torch.equal(model(x, domain="auto"), model(x, domain=truth))


def test_unknown_images_are_flagged(model):
    routed = model.route(unknown(16, seed=5))
    assert routed.domains == [None] * 16
    assert all(b in COLOURS for b in routed.best)  # the best guess is still reported


def test_classify_runs_each_image_through_its_best_domain_and_flags_unknown_ones_after_it(model):
    x = torch.cat([images(c, 8, seed=100 + i) for i, c in enumerate(COLOURS)])
    truth = [c for c in COLOURS for _ in range(8)]
    routed = model.route(x, classify=True)
    with torch.no_grad():
        assert torch.equal(routed.logits, model(x, domain="auto"))
    assert routed.best == truth and all(d in (t, None) for d, t in zip(routed.domains, truth, strict=True))
    assert sum(d is None for d in routed.domains) <= 2  # calibrated to call ~1 % of own images unknown
    assert routed.open_scores.shape == (24,) and not bool(routed.open_scores.isnan().any())
    assert model.route(x).logits is None  # by the signatures alone, no domain runs
    assert model.route(unknown(16, seed=5), classify=True).domains == [None] * 16
    signature = model.signatures["red"]
    assert signature.score_quantiles.shape == signature.energy_quantiles.shape == (len(PROBS),)
    assert bool((signature.score_quantiles.diff() >= 0).all()) and signature.open_threshold.dim() == 0
    empty = model.route(x[:0], classify=True)  # an empty batch runs nothing and answers nothing
    assert empty.domains == [] and empty.logits.shape == (0, 0) and empty.open_scores.shape == (0,)
    assert model.route(x[:0]).scores.shape == (0, 3) and model.route(x[:0]).logits is None
    with pytest.raises(ValueError, match=r"domain=\[\]"):
        model(x[:0], domain=[])


def test_an_image_its_domain_head_finds_atypical_is_unknown_though_its_signature_fits():
    """The open score adds where the image's head energy sits among its domain's own images: with the
    signature score typical, an energy below every own image's turns the decision to unknown."""
    g = torch.Generator().manual_seed(0)
    features, energies = torch.randn(512, 64, generator=g), 5 + 0.1 * torch.randn(512, generator=g)
    signature = DomainSignature.fit(features, energies=energies)
    typical = signature.score_quantiles[len(PROBS) // 2].repeat(3)  # the median held-out score
    logits = torch.stack([torch.tensor([e - math.log(2), e - math.log(2)]) for e in (5.0, 4.95, -3.0)])
    known, scores = open_decisions(typical, logits, [signature] * 3)
    assert known == [True, True, False] and scores[0] > scores[1] > scores[2]
    known, scores = open_decisions(typical, logits, [DomainSignature.fit(features)] * 3)  # uncalibrated
    assert known == [None] * 3 and bool(scores.isnan().all())
    with pytest.raises(ValueError, match="one value per feature row"):
        DomainSignature.fit(features, energies=energies[:-1])


def test_an_image_with_nan_logits_is_unknown():
    """NaN logits (a broken input or model) are no evidence that an image is typical: unknown, with a NaN
    open score, whatever its signature score (torch's searchsorted would rank NaN above every quantile)."""
    g = torch.Generator().manual_seed(0)
    features, energies = torch.randn(512, 64, generator=g), 5 + 0.1 * torch.randn(512, generator=g)
    signature = DomainSignature.fit(features, energies=energies)
    typical = signature.score_quantiles[len(PROBS) // 2].repeat(2)
    logits = torch.tensor([[5.0 - math.log(2), 5.0 - math.log(2)], [math.nan, 0.0]])
    known, scores = open_decisions(typical, logits, [signature.double()] * 2)  # (another dtype: converted)
    assert known == [True, False] and math.isnan(scores[1])


def test_the_unknown_decision_is_calibrated_on_images_the_domain_did_not_train_on():
    """A head is surer of its training images than of new ones: calibrated on its training images, the
    decision calls more than 1 % of new images unknown; calibrated on held-out ones (`calibration`,
    `train_domain`'s eval_data), about 1 %."""
    g = torch.Generator().manual_seed(1)
    features, new_features = torch.randn(2048, 32, generator=g), torch.randn(4096, 32, generator=g)
    seen, new = 6 + 0.5 * torch.randn(2048, generator=g), 5 + 0.5 * torch.randn(4096, generator=g)
    on_training = DomainSignature.fit(features, energies=seen)
    calibrated = DomainSignature.fit(features, energies=seen, calibration=(new_features[:2048], new[:2048]))
    assert torch.equal(calibrated.mean, on_training.mean)  # the mixture comes from the training images

    def flagged(signature: DomainSignature) -> float:
        best = signature.score(new_features[2048:])
        logits = new[2048:, None].expand(-1, 1)  # one class: the energy is the logit
        return sum(k is False for k in open_decisions(best, logits, [signature] * 2048)[0]) / 2048

    assert flagged(on_training) > 0.05 and 0.003 < flagged(calibrated) < 0.025
    with pytest.raises(ValueError, match="one energy per row"):
        DomainSignature.fit(features, energies=seen, calibration=(new_features, new[:5]))
    with pytest.warns(UserWarning, match="10 calibration images are too few") as caught:  # a 1 % quantile
        few = DomainSignature.fit(features, energies=seen, calibration=(new_features[:10], new[:10]))
    assert caught[0].filename == __file__  # the warning names the caller's line, not adapterkit's
    assert all(torch.equal(getattr(few, k), getattr(on_training, k)) for k in OPEN_BUFFERS)


def test_signatures_without_the_open_set_calibration_load_and_keep_their_threshold(model, tmp_path):
    loaded = without_open_calibration(model, tmp_path / "fam")
    assert loaded.signatures["red"].open_threshold is None
    assert torch.equal(loaded.signatures["green"].open_threshold, model.signatures["green"].open_threshold)
    x = torch.cat([images("red", 4, seed=11), unknown(2, seed=12)])
    assert loaded.route(x, classify=True).domains == loaded.route(x).domains  # the signature's threshold
    rewrite_domain_file(tmp_path / "fam", "green", lambda state: state.pop("signature.open_threshold"))
    with pytest.raises(ValueError, match="'green'.*open-set calibration needs all"):
        AdapterModel.from_pretrained(tmp_path / "fam")


def test_signatures_never_change_when_domains_come_and_go(model):
    before = {k: v.clone() for k, v in model.signatures["red"].state_dict().items()}
    model.add_domain("extra", num_classes=2)
    model.fit_signature("extra", batches(unknown(64, seed=9)))
    model.remove_domain("extra")
    after = model.signatures["red"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "extra" not in model.signatures


def test_signatures_can_read_fewer_feature_maps_and_must_agree(model, tmp_path):
    """`maps`: a shorter routing pass over the backbone's first feature maps; the choice travels with the
    domain's file, and every domain's signature must read the same maps."""
    short = AdapterModel.from_backbone("test_resnet")
    for i, colour in enumerate(COLOURS):
        short.add_domain(colour, num_classes=2 + i)
        short.fit_signature(colour, batches(images(colour, 96, seed=i)), maps=1)
    short.eval()
    assert int(short.signatures["red"].maps) == 1
    assert short.signatures["red"].num_features < model.signatures["red"].num_features
    x = torch.cat([images(c, 8, seed=100 + i) for i, c in enumerate(COLOURS)])
    assert short.route(x).best == [c for c in COLOURS for _ in range(8)]
    save_family(short, tmp_path / "short")
    loaded = AdapterModel.from_pretrained(tmp_path / "short")
    assert int(loaded.signatures["red"].maps) == 1
    a, b = short.route(x), loaded.route(x)  # (the family lists its domains by name)
    assert all(torch.equal(a.scores[:, a.names.index(n)], b.scores[:, b.names.index(n)]) for n in COLOURS)
    short.add_domain("extra", num_classes=2)
    assert int(short.fit_signature("extra", batches(images("red", 32, seed=1))).maps) == 1  # as the others
    short.remove_domain("extra")
    with pytest.raises(ValueError, match=r"'red' reads maps=0 .*\['blue', 'green'\] read maps=1.*maps=1"):
        short.fit_signature("red", batches(images("red", 96, seed=0)), maps=0)  # refused where attached
    assert int(short.signatures["red"].maps) == 1 and short.route(x).best == a.best
    mixed = DomainSignature(model.signatures["red"].num_features, model.signatures["red"].mean.shape[0])
    mixed.load_state_dict(model.signatures["red"].state_dict())  # (a family saved so by an older release)
    short.signatures["red"] = mixed
    with pytest.raises(ValueError, match="read different feature maps.*refit them with one `maps`"):
        short.route(x)
    short.signatures.clear()  # switching every domain's maps, as the refusal says
    for i, colour in enumerate(COLOURS):
        short.fit_signature(colour, batches(images(colour, 96, seed=i)), maps=0)
    assert short.route(x).best == a.best
    with pytest.raises(ValueError, match="maps=9"):
        short.fit_signature("red", batches(images("red", 16, seed=0)), maps=9)


def test_signature_is_small():
    model = AdapterModel.from_backbone("cifar_resnet56")  # a real architecture (test_* models are tiny)
    model.add_domain("red", num_classes=10)
    model.fit_signature("red", batches(images("red", 8 * COMPONENTS, seed=0)))  # every component fitted
    assert model.signatures["red"].mean.shape[0] == COMPONENTS
    signature_bytes = sum(t.numel() * t.element_size() for t in model.signatures["red"].state_dict().values())
    assert signature_bytes <= 0.01 * model.domain_cost("red")["bytes"]


def test_signature_travels_with_the_domain_file(model, tmp_path):
    save_family(model, tmp_path / "fam")
    loaded = AdapterModel.from_pretrained(tmp_path / "fam", domains=["green", "blue"])
    loaded.load_domain(tmp_path / "fam", "red")
    for name in COLOURS:
        a, b = model.signatures[name].state_dict(), loaded.signatures[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = images("blue", 4, seed=7)
    assert loaded.route(x).best == ["blue"] * 4


def test_a_single_gaussian_signature_written_before_mixtures_still_loads(tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("red", num_classes=2)
    features = collect_features(model, batches(images("red", 64, seed=3)))
    first = DomainSignature(features.shape[1], 1)  # the first release: float32 mean, log_var (F,), threshold
    first.mean.copy_(features.mean(dim=0))
    first.log_var = features.var(dim=0).clamp_min(1e-3).log()[None]
    first.threshold.fill_(-3.0)
    model.signatures["red"] = first
    save_family(model, tmp_path / "fam")

    def first_release(state: dict) -> None:
        state["signature.mean"], state["signature.log_var"] = first.mean[0], first.log_var[0]
        del state["signature.log_weight"], state["signature.maps"]

    rewrite_domain_file(tmp_path / "fam", "red", first_release)
    loaded = AdapterModel.from_pretrained(tmp_path / "fam")
    x = images("red", 4, seed=8)
    assert torch.equal(loaded.route(x).scores, model.route(x).scores)


def test_a_float32_signature_written_before_half_precision_loads_bit_for_bit(tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("red", num_classes=2)
    features = collect_features(model, batches(images("red", 64, seed=3)))
    # what earlier releases wrote: float32, not representable in half
    old = DomainSignature(features.shape[1], 3)
    old.mean.copy_(features[:3])
    old.log_var = torch.full_like(old.mean, 0.1 + 1e-4)
    old.threshold.fill_(-3.0)
    model.signatures["red"] = old
    save_family(model, tmp_path / "fam")
    loaded = AdapterModel.from_pretrained(tmp_path / "fam")
    assert loaded.signatures["red"].log_var.dtype == torch.float32
    assert torch.equal(loaded.signatures["red"].log_var, old.log_var)
    x = images("red", 4, seed=8)
    assert torch.equal(loaded.route(x).scores, model.route(x).scores)


def test_signatures_are_8_bit_codes_and_a_file_must_carry_their_ranges(model, tmp_path):
    signature = model.signatures["red"]
    assert signature.mean.dtype == signature.log_var.dtype == torch.uint8
    assert signature.mean_range.shape == signature.log_var_range.shape == (2, signature.num_features)
    save_family(model, tmp_path / "fam")
    rewrite_domain_file(tmp_path / "fam", "red", lambda state: state.pop("signature.mean_range"))
    with pytest.raises(ValueError, match="'red'.*signature.mean_range.*re-save the domain"):
        AdapterModel.from_pretrained(tmp_path / "fam")


def test_codes_or_half_precision_only_where_rounding_leaves_the_scores_in_place():
    g = torch.Generator().manual_seed(0)
    near = torch.randn(256, 16, generator=g)
    assert DomainSignature.fit(near).mean.dtype == torch.uint8
    # tight clusters at 10 and 20: 10 falls between two codes of the range 0-20, 40 standard deviations off
    noise = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    steep = torch.cat([noise[:100], 10 + 1e-3 * noise[100:200], 20 + 1e-3 * noise[200:]])
    assert DomainSignature.fit(steep, components=4).mean.dtype == torch.float16
    for far in (1e4 + 1e-2 * near, 1e6 + near):  # half precision's spacing there, and beyond its range
        signature = DomainSignature.fit(far, max_bytes=16 * 6 * 3 + 8)
        assert signature.mean.dtype == torch.float32
        assert signature.mean.shape[0] == 2  # float32 means: fewer components fit the same bytes
        assert torch.isfinite(signature.score(far)).all() and signature.threshold > -1e3


def test_a_byte_budget_caps_the_components(model):
    features = collect_features(model, batches(images("green", 64, seed=4)))
    full = DomainSignature.fit(features)
    size = sum(t.numel() * t.element_size() for t in full.state_dict().values())
    capped = DomainSignature.fit(features, max_bytes=size - 1)
    assert capped.mean.shape[0] == COMPONENTS - 1
    assert sum(t.numel() * t.element_size() for t in capped.state_dict().values()) < size
    assert DomainSignature.fit(features, max_bytes=size).mean.shape[0] == COMPONENTS
    assert DomainSignature.fit(features, max_bytes=1).mean.shape[0] == 1  # never fewer than one


def test_fitting_a_signature_is_deterministic(model):
    features = collect_features(model, batches(images("green", 64, seed=4)))
    a, b = DomainSignature.fit(features).state_dict(), DomainSignature.fit(features).state_dict()
    assert a["mean"].shape[0] == COMPONENTS and all(torch.equal(a[k], b[k]) for k in a)


def test_a_family_without_signatures_loads_and_routing_says_what_to_do(tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("plain", num_classes=2)
    save_family(model, tmp_path / "old")
    loaded = AdapterModel.from_pretrained(tmp_path / "old")
    assert loaded.domains == ["plain"]
    with pytest.raises(ValueError, match=r"\['plain'\] have none.*fit_signature"):
        loaded.route(images("red", 2, seed=0))
    with pytest.raises(ValueError, match="'auto' is reserved"):
        loaded.add_domain("auto", num_classes=2)


def test_train_domain_records_a_signature():
    from torch.utils.data import TensorDataset

    from adapterkit.train import TrainConfig, train_domain

    data = TensorDataset(images("red", 32, seed=1).clamp(0, 1), torch.arange(32) % 2)
    held = TensorDataset(
        images("red", 112, seed=2).clamp(0, 1), torch.arange(112) % 2
    )  # >= 100: a 1 % quantile
    signatures = []
    for eval_data in (None, held):
        model = AdapterModel.from_backbone("test_resnet")
        config = TrainConfig(steps=1, batch_size=8, progress=False)
        train_domain(model, "red", data, eval_data, config=config, data_config={"input_size": (3, 32, 32)})
        signatures.append(model.signatures["red"])
    plain, calibrated = signatures
    assert torch.isfinite(plain.threshold) and plain.open_threshold is not None
    # the mixture comes from the training images; the unknown decision is calibrated on eval_data
    assert torch.equal(plain.mean, calibrated.mean) and torch.equal(plain.threshold, calibrated.threshold)
    assert not torch.equal(plain.energy_quantiles, calibrated.energy_quantiles)


def test_a_signature_keeps_to_its_share_of_the_domain_bytes(model):
    """fit_signature's default budget: at most 1 % of the domain's adapter bytes, but never fewer than
    MIN_COMPONENTS mixture components (1 % of a small domain bought one Gaussian, which routed worse);
    None lifts it."""
    x = images("red", 8 * COMPONENTS, seed=3)
    state = model.domain_state_dict("red")
    domain_bytes = sum(
        t.numel() * t.element_size() for k, t in state.items() if not k.startswith("signature.")
    )
    capped = DomainSignature.fit(collect_features(model, batches(x)), max_bytes=int(0.01 * domain_bytes))
    nbytes = sum(t.numel() * t.element_size() for t in capped.state_dict().values())
    assert nbytes <= 0.01 * domain_bytes or capped.mean.shape[0] == 1
    free = DomainSignature.fit(collect_features(model, batches(x)))
    assert free.mean.shape[0] == COMPONENTS > capped.mean.shape[0]
    copy = AdapterModel.from_backbone("test_resnet")
    copy.add_domain("red", num_classes=2)
    assert capped.mean.shape[0] < MIN_COMPONENTS  # what the 1 % alone buys this small domain
    assert copy.fit_signature("red", batches(x)).mean.shape[0] == MIN_COMPONENTS  # the floor
    assert copy.fit_signature("red", batches(x), budget=None).mean.shape[0] == COMPONENTS
    assert copy.fit_signature("red", batches(x), components=3).mean.shape[0] == 3  # asked for fewer
    tight = copy.fit_signature("red", batches(x), budget=0.005)  # a budget passed is kept to
    assert tight.mean.shape[0] < MIN_COMPONENTS
