"""Small ResNets with parameter-free ("option A") shortcuts, registered as timm models.

Importing this module registers, in timm's model registry:

* ``cifar_resnet20/32/44/56``: the CIFAR-10 ResNets of He et al. (2016), with the state-dict layout of
  github.com/akamaster/pytorch_resnet_cifar10, so its real weights load strictly::

      timm.create_model("cifar_resnet56", pretrained=True,
                        pretrained_cfg_overlay=dict(file=".../resnet_cifar10/resnet56.safetensors"))

* ``resnet26_decathlon``: the ResNet-26 of Rebuffi et al. (NeurIPS 2017 / CVPR 2018), following
  github.com/srebuffi/residual_adapters ``models.py``: stem conv3x3 3->32 + BN (no ReLU), three stages of
  four basic blocks (64/128/256 channels, stride 2 at the first block of every stage, so 72 px -> 9 px),
  shortcuts ``avg_pool(2)`` + zero channels appended, a final BN + ReLU, global average pool, linear.
  No pretrained weights are shipped.

Every conv is a plain 3x3 ``nn.Conv2d`` (padding 1, no bias) followed by an ``nn.BatchNorm2d``, so
parallel adapters can be attached to, and folded into, each of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ["BasicBlock", "ShortcutA", "SmallResNet"]


class ShortcutA(nn.Module):
    """Parameter-free shortcut: downsample spatially, then zero-pad the channels.

    Args:
        in_chs: Input channels.
        out_chs: Output channels (``>= in_chs``).
        stride: Spatial stride (1 or 2).
        pool: ``"subsample"`` takes ``x[:, :, ::stride, ::stride]`` and pads ``(out - in) / 2`` zero
            channels on each side (He et al., option A); ``"avg"`` averages 2x2 windows and appends the
            zero channels after the input ones (Rebuffi et al.'s code).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, pool: str = "subsample") -> None:
        super().__init__()
        if pool not in ("subsample", "avg"):
            raise ValueError(f"Unknown shortcut pool {pool!r}: use 'subsample' or 'avg'.")
        if out_chs < in_chs or (pool == "subsample" and (out_chs - in_chs) % 2):
            raise ValueError(f"Cannot zero-pad {in_chs} to {out_chs} channels with pool={pool!r}.")
        self.stride, self.pool, self.pad = stride, pool, out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            if self.pool == "subsample":
                x = x[:, :, :: self.stride, :: self.stride]
            else:  # ceil_mode keeps the shape equal to the strided conv's for odd input sizes
                x = F.avg_pool2d(x, self.stride, ceil_mode=True, count_include_pad=False)
        before = self.pad // 2 if self.pool == "subsample" else 0
        return F.pad(x, (0, 0, 0, 0, before, self.pad - before))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut, then ReLU.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv.
        shortcut_pool: Pool of the option-A shortcut when the shape changes (see ``ShortcutA``).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        shortcut_pool: str = "subsample",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        if stride == 1 and in_chs == out_chs:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ShortcutA(in_chs, out_chs, stride, pool=shortcut_pool)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class SmallResNet(nn.Module):
    """ResNet of basic blocks with option-A shortcuts (the CIFAR ResNets, the Decathlon ResNet-26).

    Module names follow the akamaster CIFAR checkpoints: ``conv1``/``bn1``/``act1`` (stem),
    ``layer1``..``layerN`` (stages of ``BasicBlock``), optional ``final_bn``/``final_act``, ``global_pool``,
    ``linear`` (classifier). ``feature_info`` lists the stem and every stage (stage outputs, i.e. before
    ``final_bn``).

    Args:
        layers: Blocks per stage.
        channels: Output channels per stage.
        strides: Stride of the first block of each stage.
        stem_chs: Channels of the stem conv.
        stem_act: ReLU after the stem BN (CIFAR ResNets) or not (ResNet-26).
        final_norm: BN + ReLU after the last stage (ResNet-26).
        shortcut_pool: ``"subsample"`` or ``"avg"``, see ``ShortcutA``.
        num_classes: Classifier outputs; 0 leaves ``linear`` as ``nn.Identity``.
        in_chans: Input image channels.
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""``).
        drop_rate: Dropout before the classifier.
        zero_init_last: Zero-initialise the last BN of every block.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 3, 3),
        channels: tuple[int, ...] = (16, 32, 64),
        strides: tuple[int, ...] = (1, 2, 2),
        stem_chs: int = 16,
        stem_act: bool = True,
        final_norm: bool = False,
        shortcut_pool: str = "subsample",
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not len(layers) == len(channels) == len(strides):
            raise ValueError(
                f"layers, channels and strides need one entry per stage, got {layers}, {channels}, {strides}."
            )
        dd = dict(device=device, dtype=dtype)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True) if stem_act else nn.Identity()
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="act1")]
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(layers)))
        in_chs, reduction = stem_chs, 1
        for name, depth, out_chs, stride in zip(self.stage_names, layers, channels, strides, strict=True):
            blocks = [
                BasicBlock(
                    in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, shortcut_pool, **dd
                )
                for i in range(depth)
            ]
            self.add_module(name, nn.Sequential(*blocks))
            in_chs, reduction = out_chs, reduction * stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=name))
        self.final_bn = nn.BatchNorm2d(in_chs, **dd) if final_norm else nn.Identity()
        self.final_act = nn.ReLU(inplace=True) if final_norm else nn.Identity()

        self.num_features = in_chs
        self.global_pool, self.linear = create_classifier(in_chs, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = in_chs * self.global_pool.feat_mult()
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        """He-normal (fan-out) convs as in Rebuffi et al.; BN and linear keep PyTorch's defaults."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif zero_init_last and isinstance(m, BasicBlock):
                m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "linear" if name_only else self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; ``num_classes=0`` makes ``forward`` return pooled features.

        Args:
            num_classes: New number of classes.
            global_pool: New pooling type; ``None`` keeps the current one.
        """
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.linear = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self)
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.linear.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        stages = [getattr(self, name) for name in self.stage_names]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(stages, x, flatten=True)
        else:
            for stage in stages:
                x = stage(x)
        return self.final_act(self.final_bn(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        stop_early: bool = False,
        intermediates_only: bool = False,
        **_: Any,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's and every stage's output, NCHW, as timm's `forward_intermediates`: `indices` an int
        takes the last n, a list those indices; `stop_early` skips the stages after the last one taken."""
        count = len(self.stage_names) + 1
        keep = feature_take_indices(count, indices)[0]
        last = max(keep) if stop_early and intermediates_only else count - 1
        x = self.act1(self.bn1(self.conv1(x)))
        outputs = [x]
        for name in self.stage_names[:last]:
            x = getattr(self, name)(x)
            outputs.append(x)
        chosen = [outputs[i] for i in keep]
        return chosen if intermediates_only else (self.final_act(self.final_bn(x)), chosen)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_CIFAR = dict(channels=(16, 32, 64), strides=(1, 2, 2), stem_chs=16, stem_act=True, shortcut_pool="subsample")
model_cfgs: dict[str, dict[str, Any]] = {
    "cifar_resnet20": dict(layers=(3, 3, 3), **_CIFAR),
    "cifar_resnet32": dict(layers=(5, 5, 5), **_CIFAR),
    "cifar_resnet44": dict(layers=(7, 7, 7), **_CIFAR),
    "cifar_resnet56": dict(layers=(9, 9, 9), **_CIFAR),
    "resnet26_decathlon": dict(
        layers=(4, 4, 4),
        channels=(64, 128, 256),
        strides=(2, 2, 2),
        stem_chs=32,
        stem_act=False,
        final_norm=True,
        shortcut_pool="avg",
    ),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    model_args = dict(model_cfgs[variant], **kwargs)
    return build_model_with_cfg(
        SmallResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **model_args
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        **dict(url="", num_classes=1000, crop_pct=1.0, interpolation="bicubic", first_conv="conv1"),
        **dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, classifier="linear"),
        **kwargs,
    }


def _cifar_cfg(depth: int) -> dict[str, Any]:
    # Weights are not downloadable: pass pretrained_cfg_overlay=dict(file=".../resnet{depth}.safetensors").
    return _cfg(
        num_classes=10,
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        license="bsd-2-clause",
        origin_url="https://github.com/akamaster/pytorch_resnet_cifar10",
        paper_ids="arXiv:1512.03385",
        notes=(f"CIFAR-10 top-1 91.8-93.6 % (lossless); load resnet{depth}.safetensors via `file`.",),
    )


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20.akamaster_cifar10": _cifar_cfg(20),
        "cifar_resnet32.akamaster_cifar10": _cifar_cfg(32),
        "cifar_resnet44.akamaster_cifar10": _cifar_cfg(44),
        "cifar_resnet56.akamaster_cifar10": _cifar_cfg(56),
        "resnet26_decathlon": _cfg(
            input_size=(3, 72, 72),
            pool_size=(9, 9),
            license="apache-2.0",
            origin_url="https://github.com/srebuffi/residual_adapters",
            paper_ids="arXiv:1705.08045",
        ),
    }
)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 3x3 basic blocks of 16/32/64 channels, option-A shortcuts."""
    return _create("cifar_resnet20", pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """ResNet-32 for CIFAR (He et al. 2016): 3x5 basic blocks of 16/32/64 channels, option-A shortcuts."""
    return _create("cifar_resnet32", pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """ResNet-44 for CIFAR (He et al. 2016): 3x7 basic blocks of 16/32/64 channels, option-A shortcuts."""
    return _create("cifar_resnet44", pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 3x9 basic blocks of 16/32/64 channels, option-A shortcuts."""
    return _create("cifar_resnet56", pretrained, **kwargs)


@register_model
def resnet26_decathlon(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """ResNet-26 of the Visual Decathlon (Rebuffi et al. 2017): 3x4 basic blocks of 64/128/256, 72 px."""
    return _create("resnet26_decathlon", pretrained, **kwargs)
