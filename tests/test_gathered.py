"""Mixed-domain batches in one pass: each sample's adapter, norm and head gathered (layers/gathered.py)."""

import copy

import pytest
import timm
import torch
from checks import input_for, perturb
from torch import nn

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.compress import append_domain
from adapterkit.layers.gathered import Mixed
from adapterkit.mixed import COMPUTE_BOUND_FLOPS

DOMAINS = ["a", "b", "c", "a", "c", "b", "b"]


def make(backbone="test_resnet", config=None, factored=False, frozen=False):
    """Domains a, b, c; `frozen`: each frozen after it is built, so its tensors are packed (layers/table.py),
    as a loaded family's are."""
    torch.manual_seed(0)
    model = AdapterModel(timm.create_model(backbone), config).eval()
    for i, name in enumerate("abc"):
        model.add_domain(name, num_classes=3 + i, factored=factored)
        perturb(model, name, seed=i)
        if factored:  # later domains build on the columns earlier ones handed over: widths differ
            append_domain(model, name)
        if frozen:
            model.set_trainable(name, False)
    return model


def both(model, x, domains=DOMAINS):
    """(gathered, grouped) logits, and that the model could gather."""
    with torch.inference_mode():
        model.mixed_execution = "gathered"
        gathered = model(x, domain=domains)
        model.mixed_execution = "grouped"
        grouped = model(x, domain=domains)
    model.mixed_execution = "gathered"
    return gathered, grouped


def assert_rounding(gathered, grouped):
    finite = torch.isfinite(grouped)
    assert torch.equal(torch.isfinite(gathered), finite)  # the same -inf padding per sample
    scale = grouped[finite].abs().max()
    assert (gathered - grouped)[finite].abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_one_pass_runs_under_bf16_autocast(backbone):
    """Under autocast a layer's output is bf16 while the adapters are float32: the gathered products run
    in the output's dtype (in-place products are not autocast), to bf16 rounding of the grouped ones."""
    model = make(backbone)
    x = input_for(model.backbone, batch=len(DOMAINS))
    with torch.autocast("cpu", torch.bfloat16):
        gathered, grouped = both(model, x)
    finite = torch.isfinite(grouped)
    assert torch.equal(torch.isfinite(gathered), finite)
    error = (gathered.float() - grouped.float())[finite].abs().max() / grouped[finite].float().abs().max()
    assert float(error) <= 3e-2


@pytest.mark.parametrize(
    "backbone,config",
    [
        ("test_resnet", None),
        ("test_resnet", AdapterConfig(topology="series")),
        ("test_efficientnet", None),  # depthwise convs: grouped adapters; BatchNormAct2d
        ("test_vit", None),  # low-rank linear adapters on tokens, LayerNorm copies
        ("test_nfnet", None),
        ("test_efficientnet_gn", None),  # GroupNormAct: one call, each sample's affine part
        ("test_efficientnet_ln", None),  # LayerNormAct2d
        ("test_convnext", None),  # LayerNorm2d on NCHW maps, LayerNorm on channels-last ones
    ],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["live", "packed"])
def test_one_pass_equals_each_domain_alone(backbone, config, frozen):
    model = make(backbone, config, frozen=frozen)
    x = input_for(model.backbone, batch=len(DOMAINS))
    gathered, grouped = both(model, x)
    assert model._mixed.gatherable is True
    assert_rounding(gathered, grouped)
    alone = [model(x[i : i + 1], domain=d) for i, d in enumerate(DOMAINS)]
    for i, row in enumerate(alone):
        torch.testing.assert_close(gathered[i, : row.shape[1]], row[0].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [None, AdapterConfig(topology="series")])
def test_large_full_adapters_run_domain_by_domain_with_the_same_results(monkeypatch, config):
    """Past BY_DOMAIN_ELEMENTS the full adapters run one matmul per domain instead of one stacked
    product: equal to each domain alone, and to the stacked form, to float rounding."""
    from adapterkit.layers import gathered

    model = make("test_resnet", config)
    x = input_for(model.backbone, batch=len(DOMAINS))
    stacked, grouped = both(model, x)
    monkeypatch.setattr(gathered, "BY_DOMAIN_ELEMENTS", 0)  # every full adapter now runs by domain
    layer = next(m for m in model.layers().values() if m.rule in ("parallel", "series"))
    mixed = Mixed.of(DOMAINS, x.device)
    assert gathered._by_domain(gathered._domains(layer, x, mixed), len(DOMAINS))
    by_domain, _ = both(model, x)
    assert_rounding(by_domain, grouped)
    assert_rounding(by_domain, stacked)


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "packed"])
def test_factored_domains_of_different_widths(frozen):
    model = make("test_resnet", factored=True, frozen=frozen)
    widths = {
        a.width for layer in model.layers().values() for a in layer.adapters.values() if hasattr(a, "width")
    }
    assert len(widths) > 1
    assert_rounding(*both(model, input_for(model.backbone, batch=len(DOMAINS))))


@pytest.mark.parametrize("backbone", ["test_maxvit", "test_vit_relpos"])
def test_layers_whose_rows_are_not_samples_run_domain_groups(backbone):
    """Windows (MaxViT) and relative-position tables: found by the probe at any batch size, even one that
    equals the table's own row count; the batch then runs one domain group at a time, exactly."""
    model = make(backbone)
    x = input_for(model.backbone, batch=len(DOMAINS))
    gathered, grouped = both(model, x)
    assert model._mixed.gatherable is False
    assert torch.equal(gathered, grouped)


def test_training_mode_runs_domain_groups():
    """Norms in training mode need each domain's own batch statistics: never gathered."""
    model = make()
    x = input_for(model.backbone, batch=len(DOMAINS))
    model.train()
    gathered = copy.deepcopy(model)(x, domain=DOMAINS)
    grouped = copy.deepcopy(model)
    grouped.mixed_execution = "grouped"
    assert torch.equal(gathered, grouped(x, domain=DOMAINS))
    assert model._mixed.gatherable is None


def test_serving_changes_no_tensor():
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = input_for(model.backbone, batch=len(DOMAINS))
    gathered, _ = both(model, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert gathered.shape == (len(DOMAINS), 5)


def test_auto_groups_domains_with_fair_batches_and_gathers_the_rest():
    model = make()
    x = input_for(model.backbone, batch=16)
    with torch.inference_mode():
        auto = model(x, domain=["a", "b"] * 8)  # 2 domains, 8 images each: one pass per domain
        assert model._mixed.gatherable is None
        model.mixed_execution = "grouped"
        assert torch.equal(auto, model(x, domain=["a", "b"] * 8))
        model.mixed_execution = "auto"
        spread = ["a", "b", "c", "a", "b", "c", "a", "b"]  # 3 domains, fewer than 8 images each: gathered
        gathered = model(x[:8], domain=spread)
    assert model._mixed.gatherable is True
    model.mixed_execution = "grouped"
    assert_rounding(gathered, model(x[:8], domain=spread).detach())


def test_mixed_execution_names_its_choices():
    model = make()
    with pytest.raises(ValueError, match="'gathered', 'grouped'"):
        model.mixed_execution = "gatherd"
    assert model.mixed_execution == "auto"


@pytest.mark.parametrize(
    "size,images,domains,gathers",
    [
        # test_resnet at 32 px: 0.3 MFLOPs per adapted layer and image, overhead-bound (the CIFAR ResNets)
        (32, 8, 2, False),
        (32, 8, 4, True),
        (32, 16, 2, False),
        (32, 32, 4, False),
        (32, 32, 8, True),
        (32, 32, 32, True),
        # at 224 px: 14 MFLOPs, compute-bound (ResNet-50): few domains of 2 images or more run grouped
        (224, 8, 4, False),
        (224, 8, 2, False),
        (224, 8, 8, True),
        (224, 10, 5, True),
        (224, 40, 5, False),
    ],
)
def test_auto_policy(size, images, domains, gathers):
    """Grouped when the domains average 8 images, or 4 with at most 4 domains; on a compute-bound model
    (counted FLOPs per layer) also 2 with at most 4 domains (measured faster there: mixed.py)."""
    model = make()
    model._mixed.gatherable = True  # the backbone's probe is another test's: only the policy here
    x = input_for(model.backbone, batch=images, size=size)
    names = [f"d{i % domains}" for i in range(images)]
    model.add_domain("d0", num_classes=2)  # the FLOPs are counted through one of the batch's domains
    assert model._mixed.gathers(x, Mixed.of(names, x.device), training=False) is gathers
    for flops in model._mixed._flops.values():  # counted when the rule needs it
        assert (flops >= COMPUTE_BOUND_FLOPS) is (size == 224)


@pytest.mark.parametrize("backbone", ["test_convnext", "test_efficientnet_gn", "test_vit"])
@pytest.mark.parametrize("frozen", [False, True], ids=["live", "packed"])
def test_layer_and_group_norms_run_once_with_each_samples_affine(backbone, frozen):
    """LayerNorm and GroupNorm normalise each sample by its own statistics: a mixed batch runs each norm
    once (gathered_norms.py), not one domain's module per group of rows, and builds no module of a packed
    domain."""
    from adapterkit.layers import table

    model = make(backbone, frozen=frozen)
    x = input_for(model.backbone, batch=len(DOMAINS))
    norms = [m for m in model.modules() if type(m).__name__ == "DomainNorm"]
    assert norms
    called, built = [], []
    if not frozen:
        for norm in norms:
            for d in "abc":
                norm.adapters[d].register_forward_hook(lambda *_: called.append(1))
    original = table.Packed.module
    table.Packed.module = lambda self: built.append(self) or original(self)
    try:
        with torch.inference_mode():
            model.mixed_execution = "gathered"
            gathered = model(x, domain=DOMAINS)
    finally:
        table.Packed.module = original
    assert not called and not built
    _, grouped = both(model, x)
    assert_rounding(gathered, grouped)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
def test_packing_a_frozen_domain_changes_no_bit(backbone):
    """Frozen domains are packed into one buffer per layer (layers/table.py): the same logits, bit for bit,
    one domain at a time and mixed, and the same tensors in the domain's state dict."""
    live, packed = make(backbone), make(backbone, frozen=True)
    x = input_for(live.backbone, batch=len(DOMAINS))
    assert all(layer.adapters.is_packed("a") for layer in packed.layers().values())
    with torch.inference_mode():
        for d in "abc":
            assert torch.equal(live(x, domain=d), packed(x, domain=d))
        assert torch.equal(live(x, domain=DOMAINS), packed(x, domain=DOMAINS))
    for d in "abc":
        want, got = live.domain_state_dict(d), packed.domain_state_dict(d)
        assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_packed_domains_on_one_shared_basis_gather_without_modules():
    """After a joint re-factorisation every domain reads the same prefix of each layer's shared basis: their
    packed buffers share a layout, and the gathered pass builds each sample's basis from them (no module per
    domain), equal to each domain alone."""
    from adapterkit.compress import compress
    from adapterkit.layers import table

    model = make("test_resnet", frozen=True)
    compress(model, basis_rank=0.5)
    assert any(getattr(layer.adapters["a"], "shared_columns", 0) > 0 for layer in model.layers().values())
    model.to(torch.float32)  # (drops the modules compress materialised to count parameters)
    built = []
    original = table.Packed.module
    table.Packed.module = lambda self: built.append(self) or original(self)
    try:
        x = input_for(model.backbone, batch=len(DOMAINS))
        with torch.inference_mode():
            model.mixed_execution = "gathered"
            gathered = model(x, domain=DOMAINS)
        assert not built
    finally:
        table.Packed.module = original
    _, grouped = both(model, x)
    assert_rounding(gathered, grouped)


def _per_sample_layers(model, x, domains, kind="_per_sample_conv"):
    """The adapted convs that run a batch of `x`'s size with each sample's folded kernel: as one grouped
    conv (`_per_sample_conv`) or one batched matmul (`_per_sample_matmul`)."""
    from adapterkit.layers import gathered

    convs = [m for m in model.layers().values() if hasattr(m, "tap")]
    return [m for m in convs if gathered._per_sample(m, m.base_layer, x) is getattr(gathered, kind)]


def test_which_convs_fold_per_sample_is_decided_by_shape():
    """The CIFAR ResNets' 8-16 channel 3x3 convs fold each sample's kernel; stems (3 input channels), 32
    channels and more, channel counts off multiples of 8 and 1x1 convs keep the conv plus product."""
    from adapterkit.layers.gathered import _small

    assert _small(nn.Conv2d(16, 16, 3, padding=1)) and _small(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    for conv in (nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(12, 12, 3), nn.Conv2d(16, 16, 1)):
        assert not _small(conv)


@pytest.mark.parametrize(
    "backbone,config,factored",
    [
        ("test_resnet", None, False),
        ("test_resnet", None, True),  # low-rank adapters: each sample's basis @ gamma^T folded
        ("test_resnet", AdapterConfig(topology="series"), False),  # series adapters do not fold
        ("test_efficientnet", None, False),  # depthwise convs keep their grouped adapters
        ("test_nfnet", None, False),  # standardised convs do not fold
    ],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["live", "packed"])
def test_small_convs_run_each_samples_folded_kernel(monkeypatch, backbone, config, factored, frozen):
    """Small convs over a fair batch run as one grouped conv whose kernels are each sample's base kernel
    with its adapter folded in (every foldable conv here, with the shape rule lifted: 1x1 and strided
    convs, stems): equal to each domain alone and to the conv-plus-product form to float rounding; convs
    that cannot fold keep that form."""
    from adapterkit.layers import gathered

    model = make(backbone, config, factored=factored, frozen=frozen)
    domains = DOMAINS + DOMAINS[::-1]
    x = input_for(model.backbone, batch=len(domains))
    product, grouped = both(model, x, domains)
    assert not _per_sample_layers(model, x[:4], domains[:4])  # under PER_SAMPLE_BATCH: never
    monkeypatch.setattr(gathered, "_small", lambda conv: True)
    per_sample = _per_sample_layers(model, x, domains)
    assert per_sample or backbone == "test_nfnet"
    assert all(m.fusable and type(m.base_layer) is nn.Conv2d and m.groups == 1 for m in per_sample)
    folded, _ = both(model, x, domains)
    assert_rounding(folded, grouped)
    assert_rounding(folded, product)
    alone = [model(x[i : i + 1], domain=d) for i, d in enumerate(domains)]
    for i, row in enumerate(alone):
        torch.testing.assert_close(folded[i, : row.shape[1]], row[0].detach(), rtol=1e-5, atol=1e-5)


def test_which_pointwise_convs_run_one_matmul_is_decided_by_shape():
    """A 1x1 conv runs each sample's folded matrix as one batched matmul when its map has at least
    2 in x out / (in + out) positions (ResNet-50's 32x32 and 16x16 stages at 128 px), not on small maps,
    strided maps too small after the stride, k x k convs or channels-last maps."""
    from adapterkit.layers.gathered import _pointwise

    big, small = torch.zeros(2, 64, 32, 32), torch.zeros(2, 1024, 8, 8)
    assert _pointwise(nn.Conv2d(64, 256, 1), big)
    assert _pointwise(nn.Conv2d(256, 64, 1), torch.zeros(2, 256, 32, 32))
    assert not _pointwise(nn.Conv2d(1024, 256, 1), small)
    assert not _pointwise(nn.Conv2d(64, 256, 1, stride=8), big)  # 4x4 positions after the stride
    assert not _pointwise(nn.Conv2d(64, 64, 3, padding=1), big)
    assert not _pointwise(nn.Conv2d(64, 256, 1), big.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize(
    "backbone,config,factored",
    [
        ("test_resnet", None, False),
        ("test_resnet", None, True),  # low-rank adapters: each sample's basis @ gamma^T folded
        ("test_efficientnet", None, False),  # pointwise convs of the inverted residuals
        ("test_resnet", AdapterConfig(topology="series"), False),  # series adapters do not fold
    ],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["live", "packed"])
def test_pointwise_convs_run_each_samples_folded_matrix(monkeypatch, backbone, config, factored, frozen):
    """1x1 convs (with the shape rule lifted: every foldable one, strided too) run one batched matmul of
    each sample's folded matrix: equal to each domain alone and to the conv-plus-product form to float
    rounding, and to bf16 rounding under autocast."""
    from adapterkit.layers import gathered

    model = make(backbone, config, factored=factored, frozen=frozen)
    x = input_for(model.backbone, batch=len(DOMAINS))
    product, grouped = both(model, x)
    monkeypatch.setattr(gathered, "_pointwise", lambda conv, x: conv.kernel_size == (1, 1))
    pointwise = _per_sample_layers(model, x, DOMAINS, kind="_per_sample_matmul")
    assert pointwise and all(m.fusable and m.base_layer.kernel_size == (1, 1) for m in pointwise)
    folded, _ = both(model, x)
    assert_rounding(folded, grouped)
    assert_rounding(folded, product)
    alone = [model(x[i : i + 1], domain=d) for i, d in enumerate(DOMAINS)]
    for i, row in enumerate(alone):
        torch.testing.assert_close(folded[i, : row.shape[1]], row[0].detach(), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        folded_bf16, grouped_bf16 = both(model, x)
    finite = torch.isfinite(grouped_bf16)
    error = (folded_bf16.float() - grouped_bf16.float())[finite].abs().max()
    assert float(error / grouped_bf16[finite].float().abs().max()) <= 3e-2


def test_folded_kernels_after_domains_change_and_under_bf16_autocast(monkeypatch):
    """Each sample's folded kernel after a domain is removed and another added (nothing is cached: the next
    batch reads the tables as they are), and under bf16 autocast (to bf16 rounding of the grouped pass)."""
    from adapterkit.layers import gathered

    monkeypatch.setattr(gathered, "_small", lambda conv: True)
    model = make("test_resnet", frozen=True)
    domains = DOMAINS + DOMAINS[::-1]
    x = input_for(model.backbone, batch=len(domains))
    assert _per_sample_layers(model, x, domains)
    assert_rounding(*both(model, x, domains))
    model.remove_domain("b")
    model.add_domain("d", num_classes=4)
    perturb(model, "d", seed=7)
    domains = [d if d != "b" else "d" for d in domains]
    assert_rounding(*both(model, x, domains))
    with torch.autocast("cpu", torch.bfloat16):
        gathered_bf16, grouped_bf16 = both(model, x, domains)
    finite = torch.isfinite(grouped_bf16)
    scale = grouped_bf16[finite].float().abs().max()
    assert float((gathered_bf16.float() - grouped_bf16.float())[finite].abs().max() / scale) <= 3e-2


def test_folded_kernels_of_a_bf16_model(monkeypatch):
    """A model in bf16: each sample's kernel is folded in float32 and cast back, as `merge_conv` folds one
    domain's, so the gathered pass agrees with each domain's own to bf16 rounding."""
    from adapterkit.layers import gathered

    monkeypatch.setattr(gathered, "_small", lambda conv: True)
    model = make("test_resnet", frozen=True).to(torch.bfloat16)
    domains = DOMAINS + DOMAINS[::-1]
    x = input_for(model.backbone, batch=len(domains)).to(torch.bfloat16)
    assert _per_sample_layers(model, x, domains)
    gathered_bf16, grouped_bf16 = both(model, x, domains)
    finite = torch.isfinite(grouped_bf16)
    scale = grouped_bf16[finite].float().abs().max()
    assert float((gathered_bf16.float() - grouped_bf16.float())[finite].abs().max() / scale) <= 3e-2


def test_a_hooked_conv_keeps_its_call(monkeypatch):
    """A forward hook on a base conv (or on every module) sees that conv called, so the conv does not run
    as each sample's folded kernel while the hook is there."""
    from torch.nn.modules.module import register_module_forward_hook

    from adapterkit.layers import gathered

    monkeypatch.setattr(gathered, "_small", lambda conv: True)
    model = make("test_resnet", frozen=True)
    domains = DOMAINS + DOMAINS[::-1]
    x = input_for(model.backbone, batch=len(domains))
    layer = _per_sample_layers(model, x, domains)[0]
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        assert layer not in _per_sample_layers(model, x, domains)
        assert_rounding(*both(model, x, domains))
        assert seen
    finally:
        handle.remove()
    handle = register_module_forward_hook(lambda m, args, out: None)
    try:
        assert not _per_sample_layers(model, x, domains)
    finally:
        handle.remove()
    assert layer in _per_sample_layers(model, x, domains)
