"""Where a conv's adapter sits in its kernel, whether folding it there is exact, and the folded weights.

`conv_tap` and `not_foldable_reason` decide how an adapter maps onto a layer's weight; `merge_series`
is the series adapter's fold. The wrappers use them for eval-mode fusion, for reads of `.weight` by
modules that use a wrapped layer's weight directly, and `fold` for export: one arithmetic everywhere.
"""

from __future__ import annotations

import torch
from torch import nn


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_tap(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel tap the stride-matched 1x1 adapter stands for, and the input offset it reads at.

    The tap is the kernel centre ((k - 1) // 2 per dimension). The adapter reads input position
    `i * stride + offset`, which is exactly where that tap of the k x k conv reads, so folding the
    adapter into the tap is exact (for plain zero-padded `nn.Conv2d`; see `foldable`).
    """
    k, d = pair(conv.kernel_size), pair(conv.dilation)
    if isinstance(conv.padding, str):
        pad = (
            (0, 0)
            if conv.padding == "valid"
            else tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
        )
    else:
        pad = pair(conv.padding)
    tap = ((k[0] - 1) // 2, (k[1] - 1) // 2)
    offset = (tap[0] * d[0] - pad[0], tap[1] * d[1] - pad[1])
    return tap, offset


def not_foldable_reason(conv: nn.Module) -> str | None:
    """Why folding an adapter into this conv would not be exact, or None if it is."""
    if type(conv) is nn.Linear:
        return None
    if type(conv) is not nn.Conv2d:
        name = type(conv).__name__
        if "Same" in name:
            why = "it pads asymmetrically depending on the input size, so no single kernel tap matches the adapter"
        elif "Std" in name:
            why = "it standardises its weight before use, so a weight added to its kernel is rescaled"
        else:
            why = "it is not a plain nn.Conv2d, so adding to its weight is not known to add the adapter's output"
        return f"{name}: {why}"
    if conv.padding_mode != "zeros":
        _, offset = conv_tap(conv)
        if min(offset) < 0:
            return f"padding_mode={conv.padding_mode!r} pads the tap the adapter is folded into"
    return None


def merge_series(
    weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A conv's weight and bias with a series adapter `alpha` (out, out / groups) folded in:
    `W' = W + alpha W`, `b' = b + alpha b` per group, in float32, cast back to the weight's dtype."""
    out = weight.shape[0]
    cg = out // groups
    a = alpha.float().view(groups, cg, cg)
    wg = weight.float().view(groups, cg, -1)
    merged = (wg + torch.bmm(a, wg)).view_as(weight).to(weight.dtype)
    if bias is None:
        return merged, None
    b = bias.float().view(groups, cg, 1)
    return merged, (b + torch.bmm(a, b)).view(-1).to(bias.dtype)
