"""The invariants on a fixed sample of timm architecture families (issue 17), chosen to cover every layer
rule: BatchNorm, LayerNorm, GroupNorm and RmsNorm copies; dense, 1x1, grouped and depthwise convs;
linears; layers whose weight the model reads itself (weight space); re-parameterisable models; export
refusals (Conv2dSame, StdConv2d, ScaledStdConv2d, a classifier that is not linear).

The full sweep (one representative per family of `timm.list_models()`) is benchmarks/sweep_families.py;
its table is in docs/layer-rules.md. Models here are each family's smallest (or a cut-down config of it),
random weights, tiny inputs.
"""

import pytest
from checks import INVARIANTS, Case, CaseSpec, build_case

V = {"img_size": 32}  # transformers: 2x2 (patch 16) or 4x4 (patch 8) tokens
# (family id, timm name, create kwargs, input size, export refusal or None)
FAMILIES = [
    ("beit", "beit_base_patch16_224", {**V, "embed_dim": 64, "depth": 2, "num_heads": 2}, 32, None),
    ("byobnet-mobileone", "mobileone_s0", {}, 64, None),
    ("convit", "convit_tiny", {**V, "depth": 2}, 32, None),
    ("convnext-rmsnorm", "convnext_zepto_rms", {}, 64, None),
    ("cspnet", "cs3darknet_focus_s", {}, 64, None),
    ("cspnext", "cspnext_tiny", {}, 64, None),
    ("deit-distilled", "deit_tiny_distilled_patch16_224", {**V, "depth": 2}, 32, None),
    ("dla", "dla46x_c", {}, 64, None),
    ("edgenext", "edgenext_xx_small", {}, 64, None),
    ("efficientformer_v2", "efficientformerv2_s0", {"img_size": 64}, 64, None),
    ("efficientnet", "mobilenetv2_035", {}, 64, None),
    ("efficientvim", "efficientvim_m1", {}, 64, "ModuleList"),  # one head per stage: export refused
    ("efficientvit_mit", "efficientvit_b0", {}, 64, None),
    ("eva", "vit_tiny_patch16_dinov3_qkvb", {**V, "depth": 2}, 32, None),
    ("eva-eva02", "eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28, None),
    ("fasternet", "fasternet_t0", {}, 64, None),
    ("fastvit", "fastvit_t8", {}, 64, None),
    ("ghostnet", "ghostnet_050", {}, 64, None),
    ("hardcorenas", "hardcorenas_a", {}, 64, None),
    ("hgnet", "hgnetv2_b0", {}, 64, None),
    ("iformer", "iformer_t", {}, 64, "RepVitClassifier"),  # a distilled BatchNorm + linear head
    ("inception_next", "inception_next_atto", {}, 64, None),
    ("lcnetv2", "lcnetv2_small", {}, 64, None),
    ("levit", "levit_128s", {"img_size": 64}, 64, "NormLinear"),
    ("mambaout", "mambaout_femto", {}, 64, None),
    ("mlp_mixer", "gmlp_ti16_224", V, 32, None),
    ("mobilenetv3", "mobilenetv3_small_050", {}, 64, None),
    ("mobilenetv3-tf", "tf_mobilenetv3_small_minimal_100", {}, 64, "Conv2dSame"),
    ("mobilevit", "mobilevit_xxs", {}, 64, None),
    ("mobilevitv2", "mobilevitv2_050", {}, 64, None),  # reads qkv_proj.weight itself
    ("nfnet", "nf_regnet_b0", {}, 64, "ScaledStdConv2d"),
    ("pit", "pit_ti_224", {"img_size": 64}, 64, None),
    ("pvt_v2", "pvt_v2_b0", {}, 64, None),
    ("regnet", "regnetx_002", {}, 64, None),
    ("repghost", "repghostnet_050", {}, 64, None),
    ("repvit", "repvit_m1", {}, 64, "RepVitClassifier"),
    ("resnet", "resnet10t", {}, 64, None),
    ("rexnet", "rexnet_100", {}, 64, None),
    ("shvit", "shvit_s1", {}, 64, "more than a linear classifier"),  # BatchNorm + linear head
    ("starnet", "starnet_s050", {}, 64, None),
    ("swiftformer", "swiftformer_xs", {}, 64, None),
    ("vision_transformer", "vit_tiny_patch16_224", {**V, "depth": 2}, 32, None),
    ("vision_transformer_hybrid", "vit_tiny_r_s16_p8_224", {"img_size": 64}, 64, "StdConv2d"),
    ("vovnet", "ese_vovnet19b_slim_dw", {}, 64, None),
    ("xcit", "xcit_nano_12_p8_224", {**V, "depth": 2}, 32, None),
]
CASES = [
    CaseSpec(name, kwargs=tuple(kwargs.items()), size=size, refuse=refuse, id=family)
    for family, name, kwargs, size, refuse in FAMILIES
]


# Module scope: each family is built once; pytest runs all its invariants, then drops it.
@pytest.fixture(scope="module", params=CASES, ids=str)
def family(request) -> Case:
    return build_case(request.param)


# Known failures, each with its reason (docs/layer-rules.md lists them with the plan). strict: once fixed,
# the test fails until the entry is removed.
KNOWN: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_invariant_on_families(family, invariant, tmp_path, request):
    reason = KNOWN.get((str(family.spec), invariant))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    INVARIANTS[invariant](family, tmp_path)


def test_sample_covers_every_rule_and_forty_families():
    """The sample is what the issue asks of it: >= 40 families, every norm kind, every refusal."""
    families = {f.split("-")[0] for f, *_ in FAMILIES}
    assert len(families) >= 40, sorted(families)
    refusals = {r for *_, r in FAMILIES if r}
    assert {"NormLinear", "Conv2dSame", "ScaledStdConv2d", "StdConv2d"} <= refusals


def test_reset_head_reports_what_the_classifier_leaves_out():
    """EfficientViT-MSRA's head is BatchNorm + linear and get_classifier() is the linear alone."""
    import timm

    from adapterkit.inject import reset_head

    assert reset_head(timm.create_model("efficientvit_m0")) == ["head.bn (BatchNorm1d)"]
    assert reset_head(timm.create_model("test_resnet")) == []


def test_stateless_norm_gets_no_domain_copy():
    from torch import nn

    from adapterkit import AdapterConfig
    from adapterkit.targets import default_rule

    assert default_rule(nn.LayerNorm(8, elementwise_affine=False), AdapterConfig()) is None
    assert default_rule(nn.LayerNorm(8), AdapterConfig()) == "norm"
