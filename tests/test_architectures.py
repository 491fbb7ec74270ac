"""The invariants on real timm architectures across families (random weights, small inputs)."""

import pytest
from checks import INVARIANTS, Case, CaseSpec, build_case

# (timm name, create kwargs, input size, export refusal message or None)
ARCHITECTURES = [
    ("resnet18", {}, 64, None),
    ("resnext50_32x4d", {}, 64, None),
    ("convnext_atto", {}, 64, None),
    ("efficientnet_b0", {}, 64, None),
    ("tf_efficientnet_b0", {}, 64, "Conv2dSame: it pads asymmetrically"),
    ("mobilenetv3_small_050", {}, 64, None),
    ("regnetx_002", {}, 64, None),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, None),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64, None),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64, None),
    ("densenet121", {}, 64, None),
    ("nf_regnet_b0", {}, 64, "ScaledStdConv2d: it standardises"),
    ("resnetv2_50x1_bit", {}, 64, "StdConv2d: it standardises"),
    ("repvgg_a0", {}, 64, None),  # attached after reparameterisation
    ("inception_v3", {}, 80, None),  # valid-padding convs: the adapter sits at the centre tap
    ("levit_128s", {"img_size": 64}, 64, "NormLinear"),  # BatchNorm1d layers; head with its own norm
    ("mobilevit_xxs", {}, 64, None),
    ("ghostnet_050", {}, 64, None),
    ("dla34", {}, 64, None),  # 1x1 conv classifier
    ("cspresnet50", {}, 64, None),
]
CASES = [
    CaseSpec(name, kwargs=tuple(kwargs.items()), size=size, refuse=refuse)
    for name, kwargs, size, refuse in ARCHITECTURES
]


# Module scope: each architecture is built once; pytest runs all its invariants, then drops it.
@pytest.fixture(scope="module", params=CASES, ids=str)
def architecture(request) -> Case:
    return build_case(request.param)


@pytest.mark.slow
@pytest.mark.parametrize("invariant", INVARIANTS)
def test_invariant_on_real_architectures(architecture, invariant, tmp_path):
    INVARIANTS[invariant](architecture, tmp_path)


def test_repvgg_is_reparameterised_before_attaching():
    from adapterkit import AdapterModel

    model = AdapterModel.from_backbone("repvgg_a0")
    kinds = {t.kind for t in model.targets}
    assert "Conv2d" in kinds
    assert not any("conv_1x1" in t.name for t in model.targets)  # the 1x1 branch was fused away
