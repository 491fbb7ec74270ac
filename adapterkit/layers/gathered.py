"""One pass over a batch that mixes domains: the frozen layers run once, each sample's domain tensors gathered.

With `DomainRouter.use(Mixed(...))` every wrapper computes its frozen `base_layer` over the whole batch and
adds each sample's own adapter (a batched matrix product with the sample's adapter gathered), normalises each
sample with its own domain's statistics (one BatchNorm call over N x C channels; LayerNorm and GroupNorm, whose
statistics are each sample's own, run once with each sample's affine part: `gathered_norms.py`), and the
model applies each domain's head to its rows. Small convs (the CIFAR ResNets' 16-channel ones) over a fair
batch instead run one grouped conv whose kernels are each sample's own, its adapter folded in as a
one-domain pass folds it, and 1x1 convs on large maps one batched matmul of each sample's folded matrix.
So a batch over 32 domains costs one backbone pass plus the adapters' own products, not 32 passes of one
image (the way S-LoRA and Punica serve many LoRAs). Results agree with per-domain execution to float
rounding: the adapter is added to the layer's output instead of being fused into its weight.

Eval mode only: norms in training mode need each domain's batch statistics. A module that reads a wrapper's
`weight` itself (instead of calling it), or calls it on rows that are not the batch's samples (windows,
position tables), cannot take per-sample tensors: the layer raises `NotGatherable`, and the model runs
mixed batches one domain group at a time instead.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import FullAdapter, LowRankAdapter
from .table import Layout

if TYPE_CHECKING:
    from .wrappers import AdaptedConv2d, AdaptedLinear


# Stacking each sample's full adapter matrix copies samples x matrix elements; past this many elements per
# domain of the batch, one matmul per domain over its samples is cheaper (ResNet-50's 3x3 convs from 128
# channels on, at 32 samples over 24 domains; never the CIFAR ResNets' 16-64 channel ones).
BY_DOMAIN_ELEMENTS = 16_384

# On CPU, a k x k conv (k > 1) whose input and output channels are multiples of 8 up to PER_SAMPLE_CHANNELS
# runs a batch of at least PER_SAMPLE_BATCH samples as one grouped conv whose kernels are each sample's folded
# one (the base kernel with the sample's adapter at its tap) instead of the conv plus a batched adapter
# product. Measured on oneDNN (docs/benchmarks.md): 0.6-0.9x the time on 8-16 channel 3x3 convs (the CIFAR
# ResNets' first stage) at 8-32 samples; 1.1-1.4x on 3-4 input channels (stems), 12 channels, 32 output
# channels and more, and 1x1 convs; not measured on GPUs, which keep the product.
PER_SAMPLE_CHANNELS = 16
PER_SAMPLE_BATCH = 8
_CONTIGUOUS = torch.contiguous_format
_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)


class Mixed(NamedTuple):
    """The domains of a mixed batch: each distinct domain once, and each sample's position among them."""

    domains: tuple[str, ...]
    index: torch.Tensor  # (N,) int64, sample i belongs to domains[index[i]]
    order: tuple[int, ...]  # the same positions as Python ints
    pick: Callable[[Sequence], tuple]  # one item per domain -> one per sample, in sample order
    rows: tuple[torch.Tensor, ...]  # per domain, the indices of its samples

    @classmethod
    def of(cls, domains: list[str], device: torch.device) -> Mixed:
        """The mixed batch whose sample i belongs to `domains[i]`."""
        position = {d: i for i, d in enumerate(dict.fromkeys(domains))}
        order = tuple(position[d] for d in domains)
        pick = operator.itemgetter(*order) if len(order) > 1 else lambda items: (items[order[0]],)
        members: list[list[int]] = [[] for _ in position]
        for i, p in enumerate(order):
            members[p].append(i)
        flat = torch.tensor([i for m in members for i in m], device=device)  # one copy to the device
        rows = flat.split([len(m) for m in members])
        return cls(tuple(position), torch.tensor(order, device=device), order, pick, rows)


class NotGatherable(RuntimeError):
    """A layer of this backbone cannot run a mixed batch in one pass (the model runs domain groups instead)."""


def _modules(layer: nn.Module, mixed: Mixed) -> list[nn.Module]:
    """Each domain's module of `layer` (materialised for a packed domain)."""
    table = layer._modules["adapters"]
    try:
        return list(map(table.__getitem__, mixed.domains))
    except KeyError as e:
        raise KeyError(f"domain {e.args[0]!r} was unloaded while this call was running; call again") from None


class _Domains(NamedTuple):
    """One layer's tensors of the batch's domains: packed buffers with their layout (`table.py`: frozen
    domains, read without a module per domain), or else the domains' modules."""

    first: nn.Module  # the layout's template or the first module: the settings all share
    layout: Layout | None
    flats: list[torch.Tensor] | None
    modules: Callable[[], list[nn.Module]]  # the domains' modules (materialised when packed)


def _domains(layer: nn.Module, x: torch.Tensor, mixed: Mixed) -> _Domains:
    """The batch's domains of `layer`, once `x`'s rows are known to be the batch's samples."""
    if x.dim() < 2 or x.shape[0] != mixed.index.shape[0]:
        # windows (MaxViT), position tables (relative-position MLPs): rows that are not samples
        raise NotGatherable(
            f"{type(layer).__name__} runs on {tuple(x.shape)}, whose rows are not the samples"
        )
    packed = layer._modules["adapters"].packed_rows(mixed.domains)
    if packed is not None:
        return _Domains(packed[0].template, packed[0], packed[1], lambda: _modules(layer, mixed))
    modules = _modules(layer, mixed)
    return _Domains(modules[0], None, None, lambda: modules)


def _alphas(found: _Domains) -> list[torch.Tensor]:
    """Each domain's full adapter matrix (`_by_domain` checked that all are full adapters)."""
    if found.layout is not None:
        ((_, shape, _),) = found.layout.floats
        return [f.view(shape) for f in found.flats]
    return list(map(_ALPHA, map(_PARAMETERS, found.modules())))


def _factors(found: _Domains, beta: torch.Tensor, pick: Callable[[Sequence], tuple]):
    """Each sample's adapter: a full matrix (N, out, in), or low-rank factors (N, out, w) and (N, in, w),
    each stacked straight from the domain's tensors (one copy).

    Low-rank domains of different widths are padded with zero columns, which add exact zeros."""
    if found.layout is not None:
        first, stacked = found.first, torch.stack(pick(found.flats))
        if type(first) is FullAdapter:  # (its one tensor: alpha)
            return stacked.view(stacked.shape[0], *found.layout.floats[0][1]), None
        shared = getattr(first, "shared_columns", 0)  # one layout: the same shapes, so the same prefix
        if type(first) is LowRankAdapter and shared <= beta.shape[1]:  # (else the modules say what is wrong)
            parts = found.layout.slices(stacked)
            own = parts["beta_own"]  # each domain's basis: the shared prefix, then its own columns
            basis = torch.cat([beta[:, :shared].expand(len(own), -1, -1), own], 2) if shared else own
            return basis, parts["gamma"]
    adapters = found.modules()
    if all(map(FullAdapter.__instancecheck__, adapters)):  # (C-level maps: this runs per layer and domain)
        return torch.stack(pick(list(map(_ALPHA, map(_PARAMETERS, adapters))))), None
    if not all(isinstance(a, LowRankAdapter) for a in adapters):
        return torch.stack(pick([a.weight(beta) for a in adapters])), None
    bases, gammas = [a.basis(beta) for a in adapters], [a.gamma for a in adapters]
    width = max(a.width for a in adapters)
    if any(a.width != width for a in adapters):
        bases = [F.pad(b, (0, width - b.shape[1])) for b in bases]
        gammas = [F.pad(g, (0, width - g.shape[1])) for g in gammas]
    return torch.stack(pick(bases)), torch.stack(pick(gammas))


def _columns(
    x: torch.Tensor, matrix: torch.Tensor, gamma: torch.Tensor | None, into: torch.Tensor | None = None
) -> torch.Tensor:
    """Each sample's adapter applied to the columns of `x` (N, in, P): added into `into` (N, out, P) in
    place, or a new tensor."""
    if into is not None:
        matrix, x, gamma = _like(into, matrix, x, gamma)
    if gamma is not None:
        x = torch.bmm(gamma.transpose(1, 2), x)
    return torch.bmm(matrix, x) if into is None else into.baddbmm_(matrix, x)


def _like(out: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` in `out`'s dtype: under autocast a layer's output may be bf16 while the adapter and the
    input it reads are float32, and in-place products (`baddbmm_`) are not autocast."""
    return tuple(t if t is None or t.dtype == out.dtype else t.to(out.dtype) for t in tensors)


def _add_rows(y: torch.Tensor, x: torch.Tensor, matrix: torch.Tensor, gamma: torch.Tensor | None) -> None:
    """`y` (N, P, out) += each sample's adapter applied to the rows of `x` (N, P, in), in place."""
    matrix, x, gamma = _like(y, matrix, x, gamma)
    if gamma is not None:  # (w, in) @ (in, P): 1.2-4.5x faster than (P, in) @ (in, w), whose output is thin
        x = torch.bmm(gamma.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)
    y.baddbmm_(x, matrix.transpose(1, 2))


def _tap(layer: AdaptedConv2d, conv: nn.Module, x: torch.Tensor, stride, out: torch.Size) -> torch.Tensor:
    """What the stride-matched 1x1 adapter reads: `x` at the conv's tap, every `stride`-th position."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if layer.offset == (0, 0) or type(conv) is not nn.Conv2d:  # (the common case: views of x, no padding)
        src = x if sh == sw == 1 else x[..., ::sh, ::sw]
        if src.shape[-2] >= out[0] and src.shape[-1] >= out[1]:
            return src if src.shape[-2:] == out else src[..., : out[0], : out[1]]
    return layer._align(x, tuple(out))[..., ::sh, ::sw][..., : out[0], : out[1]]


def _by_domain(found: _Domains, samples: int) -> bool:
    """Whether full adapters run one domain at a time: when stacking each sample's matrix would copy more
    than `BY_DOMAIN_ELEMENTS` elements per domain (large matrices, several samples per domain)."""
    if found.layout is not None:
        if type(found.first) is not FullAdapter:
            return False
        count, numel = len(found.flats), found.flats[0].numel()
    else:
        modules = found.modules()
        if not all(map(FullAdapter.__instancecheck__, modules)):
            return False
        count, numel = len(modules), modules[0]._parameters["alpha"].numel()
    return samples * numel > BY_DOMAIN_ELEMENTS * count


def _add_by_domain(y: torch.Tensor, columns: torch.Tensor, alphas: list[torch.Tensor], mixed: Mixed) -> None:
    """`y` (N, out, P) += each domain's adapter applied to its samples' `columns` (N, in, P), in place."""
    for alpha, rows in zip(alphas, mixed.rows, strict=True):
        y.index_add_(0, rows, torch.matmul(alpha, columns.index_select(0, rows)))


def _small(conv: nn.Conv2d) -> bool:
    """Whether a conv's shape is one where each sample's folded kernel was measured faster."""
    cin, cout = conv.in_channels, conv.out_channels
    return (
        cin % 8 == 0
        and cout % 8 == 0
        and max(cin, cout) <= PER_SAMPLE_CHANNELS
        and conv.kernel_size != (1, 1)
    )


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether a 1x1 conv runs as one batched matmul of each sample's folded (out, in) matrix: an NCHW map
    with at least 2 in x out / (in + out) positions, where building the matrices costs less than the
    adapter's own products (ResNet-50's first two stages at 128 px; not its 8x8 and 4x4 maps)."""
    if (
        conv.kernel_size != (1, 1)
        or conv.padding != (0, 0)
        or conv.dilation != (1, 1)
        or not x.is_contiguous()
    ):
        return False
    positions = -(-x.shape[-2] // conv.stride[0]) * -(-x.shape[-1] // conv.stride[1])
    cin, cout = conv.in_channels, conv.out_channels
    return 2 * cin * cout <= positions * (cin + cout)


def _per_sample(layer: AdaptedConv2d, conv: nn.Module, x: torch.Tensor) -> Callable | None:
    """How the conv runs each sample's folded kernel, if it does: `_per_sample_conv` (a small k x k conv
    over a fair batch) or `_per_sample_matmul` (a 1x1 conv on a large map); on CPU, for an adapter that
    folds exactly into a plain zero-padded conv without hooks."""
    if not (
        x.device.type == "cpu"
        and type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and layer.fusable
        and not (conv._forward_hooks or conv._forward_pre_hooks or any(_GLOBAL_HOOKS))  # (they see its call)
    ):
        return None
    if x.shape[0] >= PER_SAMPLE_BATCH and _small(conv):
        return _per_sample_conv
    return _per_sample_matmul if _pointwise(conv, x) else None


def _per_sample_matmul(
    layer: AdaptedConv2d, conv: nn.Conv2d, x: torch.Tensor, matrix: torch.Tensor, gamma: torch.Tensor | None
) -> torch.Tensor:
    """A 1x1 conv as one batched matmul of each sample's folded (out, in) matrix, the base weight plus its
    adapter (in float32, as `merge_conv`), over the sample's (in, positions) columns: 1.1-3.9x faster than
    oneDNN's conv plus the adapter's products on ResNet-50's 32x32 and 16x16 maps at batch 16."""
    n, weight = x.shape[0], conv.weight
    base = weight.view(1, weight.shape[0], -1).float()
    if gamma is not None:  # as LowRankAdapter.weight: basis @ gamma^T
        kernels = torch.baddbmm(base, matrix.float(), gamma.float().transpose(1, 2))
    else:
        kernels = base + matrix.float()
    src = x if conv.stride == (1, 1) else x[..., :: conv.stride[0], :: conv.stride[1]]
    h, w = src.shape[-2:]
    columns = src.reshape(n, -1, h * w)
    y = torch.bmm(kernels.to(columns.dtype), columns)
    if conv.bias is not None:
        y += conv.bias.view(1, -1, 1).to(y.dtype)
    return y.view(n, -1, h, w)


def _per_sample_conv(
    layer: AdaptedConv2d, conv: nn.Conv2d, x: torch.Tensor, matrix: torch.Tensor, gamma: torch.Tensor | None
) -> torch.Tensor:
    """The conv with each sample's adapter folded into its own kernel, as `merge_conv` folds one domain's
    (float32, cast back): one conv over (1, N C, H, W) with N groups."""
    n, weight = x.shape[0], conv.weight
    if gamma is not None:  # as LowRankAdapter.weight: basis @ gamma^T
        matrix = torch.bmm(matrix, gamma.transpose(1, 2))
    # (each op counts here: a layer runs a dozen small ones, each paying the dispatcher after the conv)
    f32 = weight.dtype == matrix.dtype == torch.float32
    kernels = (weight if f32 else weight.float()).expand(n, *weight.shape).clone(memory_format=_CONTIGUOUS)
    kernels[..., layer.tap[0], layer.tap[1]].add_(matrix if f32 else matrix.float())  # (no write-back copy)
    bias = None if conv.bias is None else conv.bias.repeat(n)
    flat = x.reshape(1, -1, *x.shape[2:])
    kernels = (kernels if f32 else kernels.to(weight.dtype)).flatten(0, 1)
    y = F.conv2d(flat, kernels, bias, conv.stride, conv.padding, conv.dilation, n)
    return y.view(n, -1, *y.shape[2:])


def conv_forward(layer: AdaptedConv2d, x: torch.Tensor, mixed: Mixed) -> torch.Tensor:
    """The conv once over the batch, plus each sample's 1x1 adapter (stride-matched, at the conv's tap)."""
    found = _domains(layer, x, mixed)
    conv = layer._modules["base_layer"]
    folded = _per_sample(layer, conv, x)
    if folded is not None:
        return folded(layer, conv, x, *_factors(found, layer._buffers["beta"], mixed.pick))
    y = conv(x)
    src = y if layer.rule == "series" else _tap(layer, conv, x, found.first.stride, y.shape[-2:])
    n, c, h, w = src.shape
    groups = conv.groups if layer.rule == "grouped" else 1
    if groups == 1 and y.is_contiguous() and _by_domain(found, n):
        _add_by_domain(y.view(n, -1, h * w), src.reshape(n, c, h * w), _alphas(found), mixed)
        return y
    matrix, gamma = _factors(found, layer._buffers["beta"], mixed.pick)
    if groups == 1:
        if src is not y and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
            # channels-last maps are rows (N, P, C): the adapter adds into them in place
            rows = src.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (a view when src is channels-last too)
            _add_rows(y.permute(0, 2, 3, 1).view(n, h * w, -1), rows, matrix, gamma)
            return y
        columns = src.reshape(n, c, h * w)
        if y.is_contiguous() and src is not y:  # (a series adapter reads y: not in place)
            _columns(columns, matrix, gamma, into=y.view(n, -1, h * w))
            return y
        return y.add_(_columns(columns, matrix, gamma).view(n, -1, h, w))
    out = matrix.shape[1]
    if out == c == groups:  # depthwise: each sample's adapter scales each channel
        scale, src = _like(y, matrix.view(n, out, 1, 1), src)
        return y.addcmul_(src, scale)
    # grouped adapters are full matrices, per group: (N, G, out/G, in/G) @ (N, G, in/G, P)
    grouped = matrix.reshape(n, groups, out // groups, c // groups)
    delta = torch.matmul(grouped, src.reshape(n, groups, c // groups, h * w))
    return y.add_(delta.reshape(n, -1, h, w))


def linear_forward(layer: AdaptedLinear, x: torch.Tensor, mixed: Mixed) -> torch.Tensor:
    """The linear once over the batch, plus each sample's adapter on its rows (tokens)."""
    found = _domains(layer, x, mixed)
    y = layer.base_layer(x)
    matrix, gamma = _factors(found, layer._buffers["beta"], mixed.pick)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if y.is_contiguous():
        _add_rows(y.view(rows.shape[0], rows.shape[1], -1), rows, matrix, gamma)
        return y
    delta = torch.zeros(rows.shape[0], rows.shape[1], y.shape[-1], dtype=y.dtype, device=y.device)
    _add_rows(delta, rows, matrix, gamma)
    return y.add_(delta.reshape(y.shape))


_PARAMETERS = operator.attrgetter("_parameters")
_ALPHA = operator.itemgetter("alpha")
