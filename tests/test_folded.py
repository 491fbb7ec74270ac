"""Training with adapters folded into the frozen layers (`layers/folded.py`): the same outputs and gradients
as the separate-adapter form, and no weight gradient for the frozen backbone."""

import copy

import pytest
import timm
import torch
from checks import input_for, perturb
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapterkit import AdapterModel
from adapterkit.layers import AdaptedConv2d, AdaptedLinear, DomainRouter

CONVS = [  # kernel, stride, padding, dilation, groups
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    (7, 2, 3, 1, 1),
    (1, 1, 0, 1, 1),
    (1, 2, 0, 1, 1),
    (4, 4, 0, 1, 1),  # patch embedding: the tap reads inside each patch
    (3, 1, 2, 1, 1),  # padding beyond the tap: the adapter reads zeros at both ends
    (2, 2, 1, 1, 1),  # even kernel: the tap is off centre
    (3, 1, 2, 2, 1),
    (3, 2, 1, 1, 4),
    (3, 1, 1, 1, 8),  # depthwise
]


def pair_of_layers(layer, rule, factored):
    """A layer with one domain's non-zero adapter, and a copy that runs the adapter as a separate op."""
    router = DomainRouter()
    if isinstance(layer, nn.Conv2d):
        a = AdaptedConv2d(layer, router, rule)
    else:
        a = AdaptedLinear(layer, router)
    a.adapters["d"] = a.new_adapter(factored=factored)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.adapters["d"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    b = copy.deepcopy(a)
    object.__setattr__(b, "router", router)
    b.fused.enabled = False
    return router, a.train(), b.train()


def run_both(router, a, b, x):
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with router.use("d"):
        ya, yb = a(xa), b(xb)
    grad = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2))
    ya.backward(grad)
    yb.backward(grad)
    return (ya, xa.grad), (yb, xb.grad)


def assert_same_training(router, a, b, x):
    (ya, ga), (yb, gb) = run_both(router, a, b, x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(a.adapters["d"].named_parameters(), b.adapters["d"].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert a.base_layer.weight.grad is None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("k", "s", "p", "d", "g", "factored"),
    [(*c, factored) for c in CONVS for factored in (False, True) if not (factored and c[-1] > 1)],
)  # grouped adapters have no low-rank form
def test_folded_conv_matches_the_separate_adapter(k, s, p, d, g, factored, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16 if g < 8 else 8, k, s, p, dilation=d, groups=g)
    router, a, b = pair_of_layers(conv, "parallel", factored)
    assert a.train_fused and not b.fused.enabled
    x = torch.randn(2, 8, 11, 13)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert_same_training(router, a, b, x)


@pytest.mark.parametrize("shape", [(3, 12), (3, 5, 12), (2, 3, 4, 12)])  # tokens; (N, H, W, C) maps
@pytest.mark.parametrize("factored", [False, True])
def test_folded_linear_matches_the_separate_adapter(factored, shape):
    torch.manual_seed(0)
    router, a, b = pair_of_layers(nn.Linear(12, 20), "lowrank", factored)
    assert_same_training(router, a, b, torch.randn(shape))


def test_folded_forward_is_the_eval_mode_fused_layer_bit_for_bit():
    """Training folds with the arithmetic of eval-mode fusion and export: the same bits for the same input."""
    torch.manual_seed(0)
    for layer, x in (
        (nn.Conv2d(8, 16, 3, 2, 1), torch.randn(2, 8, 9, 9)),
        (nn.Linear(12, 20), torch.randn(4, 12)),
    ):
        router, a, _ = pair_of_layers(layer, "parallel", factored=isinstance(layer, nn.Linear))
        with router.use("d"):
            trained = a.train()(x)
            with torch.no_grad():
                served = a.eval()(x)
            exported = a.fold("d")(x)
        assert torch.equal(trained, served)
        assert torch.equal(trained, exported)


def test_base_weight_that_requires_grad_gets_the_merged_weights_gradient():
    torch.manual_seed(0)
    router, a, b = pair_of_layers(nn.Conv2d(8, 16, 3, 1, 1), "parallel", factored=True)
    for layer in (a, b):
        layer.base_layer.requires_grad_(True)
    run_both(router, a, b, torch.randn(2, 8, 7, 7))
    torch.testing.assert_close(a.base_layer.weight.grad, b.base_layer.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.base_layer.bias.grad, b.base_layer.bias.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(a.adapters["d"].parameters(), b.adapters["d"].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


class ConvCalls(TorchDispatchMode):
    """Counts forward convolutions; records the weight shape and output mask of every convolution backward."""

    def __init__(self):
        super().__init__()
        self.forward, self.calls = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls.append((tuple(args[2].shape), tuple(args[-1])))
        elif func is torch.ops.aten.convolution.default:
            self.forward += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_computes_no_weight_gradient_of_the_frozen_convs():
    """The adapter's gradient is a 1x1 weight gradient; the frozen k x k kernels get none (the floor's work
    plus the adapter's, issue 12.5)."""
    torch.manual_seed(0)
    model = AdapterModel(timm.create_model("test_resnet")).train()
    model.add_domain("a", num_classes=3)
    perturb(model, "a")
    x = input_for(model.backbone, batch=2)
    with ConvCalls() as calls:
        model(x, domain="a").sum().backward()
    assert calls.forward == sum(isinstance(m, nn.Conv2d) for m in model.backbone.modules())  # one per layer
    kernels = {shape[-2:] for shape, mask in calls.calls}
    assert (3, 3) in kernels  # the k x k convs ran their (input-gradient) backward
    weight_grads = [shape for shape, (_, weight, _) in calls.calls if weight]
    assert all(shape[-2:] == (1, 1) for shape in weight_grads)  # (adapters' gradients are matmuls)
    assert all(p.grad is not None for p in model.trainable_parameters("a"))


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 16, 3, 2, 1), nn.Linear(12, 20)], ids=["conv", "linear"])
def test_folded_training_under_bf16_autocast(layer):
    """Under autocast the folded op computes in bf16 like the separate ops, and returns float32 gradients."""
    torch.manual_seed(0)
    router, a, b = pair_of_layers(layer, "parallel", factored=isinstance(layer, nn.Linear))
    x = torch.randn(2, 8, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ya, ga), (yb, gb) = run_both(router, a, b, x)
    assert ya.dtype == yb.dtype == torch.bfloat16 and ga.dtype == torch.float32
    # bf16 rounds the merged weight and the separate products differently: compare at bf16's precision
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2 * float(yb.detach().abs().max()))
    torch.testing.assert_close(ga, gb, rtol=2e-2, atol=2e-2 * float(gb.abs().max()))
    for p, q in zip(a.adapters["d"].parameters(), b.adapters["d"].parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2 * float(q.grad.abs().max()))
