"""The invariants on real timm architectures across families (random weights, small inputs)."""

import pytest
import timm
import torch
from checks import check_all, input_for

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


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,size,refuse", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_invariants_on_real_architectures(name, kwargs, size, refuse, tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model(name, **kwargs)
    check_all(backbone, None, input_for(backbone, size=size), tmp_path, refuse=refuse)


def test_repvgg_is_reparameterised_before_attaching():
    from adapterkit import AdapterModel

    model = AdapterModel.from_backbone("repvgg_a0")
    kinds = {t.kind for t in model.targets}
    assert "Conv2d" in kinds
    assert not any("conv_1x1" in t.name for t in model.targets)  # the 1x1 branch was fused away
