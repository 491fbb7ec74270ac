"""Training with the adapter folded into a layer's frozen weight, differentiated only where it must be.

A domain's training step needs no gradient for the frozen backbone, so its floor is the backbone's
forward plus the pass that carries the gradient back to the input. `folded_conv2d` and `folded_linear`
keep a parallel adapter's step close to it: the forward runs one conv (matmul) with the merged weight
`W + A` (for a k x k conv the 1x1 adapter `A` sits in the kernel's tap, as eval-mode fusion and export
fold it), and the backward computes

- the input gradient with the merged weight (one conv-backward or matmul, as the frozen backbone's own);
- the adapter's gradient alone, never the frozen weight's: for a full adapter a 1x1 weight gradient over
  the stride-matched input at the tap (`1/k²` of the k x k one autograd would compute for a merged
  kernel); for a low-rank adapter `beta gamma^T` the two factors' gradients through the rank-r
  bottleneck (`x gamma` and `grad_y beta`), never the full (out, in) matrix.

The separate-adapter form instead runs extra convs or matmuls forward and backward over every feature map
and adds activations and input gradients, a quarter of the step on ResNets (docs/benchmarks.md).

The adapter arrives as tensors autograd tracks (`alpha`, or the basis and `gamma` of a low-rank adapter),
so gradients reach the adapter's parameters (`beta_own` through the basis) through autograd's own ops.
Valid where folding is exact (`not_foldable_reason`) and, for convs, `foldable_in_training`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused import merge_conv, merge_linear

_conv_backward = torch.ops.aten.convolution_backward.default


def foldable_in_training(conv: nn.Module) -> bool:
    """Whether `folded_conv2d` can run this conv: a plain `nn.Conv2d` (whose fold the caller checks with
    `not_foldable_reason`) padded with zeros by numbers (a string padding such as "same" may pad
    asymmetrically, which the backward's convolution call cannot express)."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def tap_input(x: torch.Tensor, offset: tuple[int, int], stride: tuple[int, int], out: tuple[int, int]):
    """The input rows and columns the kernel's tap reads for the output positions `i < out`: row
    `i * stride + offset`, zero outside `x` (the conv's padding). A view of `x` unless it needs padding;
    a 1x1 conv of stride `stride` over it gives exactly `out` positions."""
    h, w = x.shape[-2:]
    need = [(o - 1) * s + 1 for o, s in zip(out, stride, strict=True)]
    top, left = offset
    bottom, right = top + need[0] - h, left + need[1] - w  # > 0: rows past the end (bottom padding)
    if min(top, left) < 0 or max(bottom, right) > 0:
        return F.pad(x, (-left, right, -top, bottom))  # negative amounts crop
    return x[..., top : top + need[0], left : left + need[1]]


class Spec(NamedTuple):
    """Where the adapter sits and how the layer runs (conv settings; all None for a linear)."""

    tap: tuple[int, int] | None = None
    offset: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | None = None
    dilation: tuple[int, int] | None = None
    groups: int = 1


def _adapter_matrix(a: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return a if gamma is None else a @ gamma.T  # as LowRankAdapter.weight: basis @ gamma^T


def _merged(weight: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor | None, spec: Spec) -> torch.Tensor:
    adapter = _adapter_matrix(a, gamma)
    return merge_linear(weight, adapter) if spec.tap is None else merge_conv(weight, adapter, spec.tap)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Feature vectors as (N, C, P) for NCHW maps ("nchw"), else as (M, C): channels-last maps ("nhwc"),
    and linear inputs ("linear", features last)."""
    if layout == "nchw":
        return t.reshape(t.shape[0], t.shape[1], -1)
    if layout == "nhwc":
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _project(t: torch.Tensor, factor: torch.Tensor, layout: str) -> torch.Tensor:
    """`_rows(t) @ factor`, (M, k), in the forms CPU kernels run fastest with a thin output (measured on
    ResNet-50's and ViT-S's shapes): for channels-last maps a 1x1 conv with k output channels (oneDNN,
    2-3x faster than the GEMM), for rows a GEMM with the factor as a transposed contiguous (k, C)
    operand (1.3-2x faster than with the (C, k) one)."""
    if layout == "nhwc":
        return _rows(F.conv2d(t, factor.T[:, :, None, None]), "nhwc")
    return F.linear(_rows(t, layout), factor.T.contiguous())


def _low_rank_grads(
    x: torch.Tensor, grad_y: torch.Tensor, basis: torch.Tensor, gamma: torch.Tensor, layout: str
):
    """Gradients of `basis` (out, k) and `gamma` (in, k) for y = x (basis gamma^T)^T, through the rank-k
    bottleneck: each reads `x` and `grad_y` once more and never forms an (out, in) matrix."""
    xr, gr = _rows(x, layout), _rows(grad_y, layout)
    if xr.dim() == 3:  # (N, C, P): a batch of (C, P) matrices, summed over N
        n = xr.shape[0]  # bmm with the factor broadcast (a 2-D @ 3-D matmul would copy x transposed)
        h, g = torch.bmm(gamma.T.expand(n, -1, -1), xr), torch.bmm(basis.T.expand(n, -1, -1), gr)
        return torch.bmm(gr, h.mT).sum(0), torch.bmm(xr, g.mT).sum(0)
    # as (k, M) @ (M, C) products, transposed back: on CPU 3-4x faster than (C, M) @ (M, k), whose long
    # transposed operand and thin output the GEMM runs poorly
    h, g = _project(x, gamma, layout), _project(grad_y, basis, layout)
    return (h.T @ gr).T, (g.T @ xr).T


def _input_and_weight_grads(ctx, x, grad_y, merged, need_x: bool, need_w: bool):
    spec = ctx.spec
    if spec.tap is not None:
        grad_x, grad_w, _ = _conv_backward(
            grad_y, x, merged, None, spec.stride, spec.padding, spec.dilation, False, [0, 0], spec.groups,
            [need_x, need_w, False],
        )  # fmt: skip
        return grad_x, grad_w
    grad_x = grad_y @ merged if need_x else None
    grad_w = _rows(grad_y, "linear").T @ _rows(x, "linear") if need_w else None
    return grad_x, grad_w


def _full_grad(x: torch.Tensor, grad_y: torch.Tensor, layout: str) -> torch.Tensor:
    """The (out, in) gradient of a full adapter: `grad_y` times `x` transposed, summed over positions. As
    one batched matmul (NCHW) or matmul: on CPU 1-4x faster than oneDNN's 1x1 weight gradient on NCHW
    maps (on channels-last maps oneDNN's is the faster one: `_adapter_grads`)."""
    xr, gr = _rows(x, layout), _rows(grad_y, layout)
    return torch.bmm(gr, xr.mT).sum(0) if xr.dim() == 3 else gr.T @ xr


def _adapter_grads(ctx, x, grad_y, a, gamma, grad_w):
    """Gradients of the adapter's tensors: from the merged weight's gradient when the frozen weight needed
    one anyway, else from the tap's input alone."""
    spec = ctx.spec
    if grad_w is not None:
        ga = grad_w if spec.tap is None else grad_w[:, :, spec.tap[0], spec.tap[1]]
        return (ga, None) if gamma is None else (ga @ gamma, ga.T @ a)
    if spec.tap is None:
        if gamma is None:
            return _full_grad(x, grad_y, "linear"), None
        return _low_rank_grads(x, grad_y, a, gamma, "linear")
    x = tap_input(x, spec.offset, spec.stride, tuple(grad_y.shape[-2:]))
    layout = "nhwc" if _channels_last(x) or _channels_last(grad_y) else "nchw"
    if spec.groups > 1 or (gamma is None and layout == "nhwc"):
        # grouped / depthwise, and a full adapter on channels-last maps: the conv's own weight gradient
        # (oneDNN; in NHWC 1-30x faster than the matmul, most on the stem's 3 input channels)
        ga = _conv_backward(
            grad_y, x, a[:, :, None, None], None, spec.stride, [0, 0], [1, 1], False, [0, 0], spec.groups,
            [False, True, False],
        )[1]  # fmt: skip
        return ga[:, :, 0, 0], None
    if spec.stride != (1, 1):
        x = x[..., :: spec.stride[0], :: spec.stride[1]]
        if layout == "nhwc":  # once, for both products that read it
            x = x.contiguous(memory_format=torch.channels_last)
    if gamma is None:
        return _full_grad(x, grad_y, layout), None
    return _low_rank_grads(x, grad_y, a, gamma, layout)


class _Folded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, gamma, spec: Spec):
        merged = _merged(weight, a, gamma, spec)
        ctx.save_for_backward(x, weight, a, gamma)  # the merged weight is rebuilt in backward (same bits)
        ctx.spec = spec
        if spec.tap is None:
            y = F.linear(x, merged, bias)
        else:
            y = F.conv2d(x, merged, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        # under autocast the op ran in a lower precision: backward computes in it too, as autograd would
        ctx.dtypes = (y.dtype, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, a, gamma = ctx.saved_tensors
        dtype, x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_bias, need_a, need_gamma = ctx.needs_input_grad[:5]
        with torch.autocast(x.device.type, enabled=False):
            channels_last = ctx.spec.tap is not None and _channels_last(x)
            grad_y = grad_y.to(dtype).contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            x = x.to(dtype)
            grad_x = grad_w = grad_bias = grad_a = grad_gamma = None
            if need_x or need_w:
                merged = _merged(weight, a, gamma, ctx.spec).to(dtype)
                grad_x, grad_w = _input_and_weight_grads(ctx, x, grad_y, merged, need_x, need_w)
            if need_bias:
                grad_bias = (
                    grad_y.sum((0, 2, 3)) if ctx.spec.tap is not None else _rows(grad_y, "linear").sum(0)
                )
            if need_a or need_gamma:
                low = (a.to(dtype), None if gamma is None else gamma.to(dtype))
                grad_a, grad_gamma = _adapter_grads(ctx, x, grad_y, *low, grad_w)
        return (
            _cast(grad_x, x_dtype),
            _cast(grad_w, w_dtype),
            _cast(grad_bias, b_dtype),
            _cast(grad_a, a.dtype),
            _cast(grad_gamma, None if gamma is None else gamma.dtype),
            None,
        )


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _parts(adapter: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
    return (adapter, None) if isinstance(adapter, torch.Tensor) else adapter


def folded_conv2d(
    x: torch.Tensor,
    conv: nn.Conv2d,
    adapter: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    tap: tuple[int, int],
    offset: tuple[int, int],
) -> torch.Tensor:
    """`conv(x)` plus its parallel 1x1 adapter read at `tap`, as one conv.

    Args:
        adapter: the full (out, in / groups) matrix, or low-rank factors `(basis, gamma)`, basis (out, k)
            and gamma (in, k): the adapter is `basis @ gamma.T`.
        tap, offset: the kernel tap the adapter is folded into and the input offset it reads at
            (`folding.conv_tap`).

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False)
        >>> a = torch.zeros(8, 4, requires_grad=True)
        >>> folded_conv2d(torch.randn(2, 4, 6, 6), conv, a, (1, 1), (0, 0)).sum().backward()
        >>> a.grad.shape
        torch.Size([8, 4])
    """
    a, gamma = _parts(adapter)
    spec = Spec(tap, offset, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    return _Folded.apply(x, conv.weight, conv.bias, a, gamma, spec)


def folded_linear(
    x: torch.Tensor, linear: nn.Linear, adapter: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """`linear(x)` plus its parallel adapter (a full (out, in) matrix, or `(basis, gamma)`), as one matmul."""
    a, gamma = _parts(adapter)
    return _Folded.apply(x, linear.weight, linear.bias, a, gamma, Spec())
