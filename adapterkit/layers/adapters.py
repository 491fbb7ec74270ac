"""Per-domain adapter tensors: a full 1x1 `alpha`, or low-rank factors `beta gamma^T`.

These modules hold one domain's weights for one adapted layer and compute that domain's
contribution. They know nothing of timm or of domain routing (see `wrappers.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FullAdapter(nn.Module):
    """A full 1x1 adapter `alpha` of shape (out, in / groups), zero-initialised.

    Used for dense k x k convs (parallel or series topology) and, with `groups > 1`, as the
    per-channel (depthwise) or grouped adapter.

    Example:
        >>> a = FullAdapter(8, 16, groups=1, stride=2, conv=True)
        >>> a(torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 16, 2, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: int = 1,
        stride: tuple[int, int] | int = 1,
        conv: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.stride = stride
        self.conv = conv
        self.alpha = nn.Parameter(
            torch.zeros(out_features, in_features // groups, device=device, dtype=dtype)
        )

    def weight(self, beta: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter as an (out, in / groups) matrix."""
        return self.alpha

    def forward(self, x: torch.Tensor, beta: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, self.alpha[:, :, None, None], stride=self.stride, groups=self.groups)
        return F.linear(x, self.alpha)


class LowRankAdapter(nn.Module):
    """A factored adapter `[beta[:, :k], beta_own] @ gamma^T`.

    `beta` is the layer's shared, append-only basis (out x K). This domain was built on its first
    k = `shared_columns` columns and owns `beta_own` (out x `own_columns`) columns that no other domain
    reads, and `gamma` (in x `width`, width = shared + own columns). Columns appended to the shared basis
    later are never read, so the domain's output does not change when other domains arrive.

    At creation `beta_own` is zero and the part of `gamma` facing `beta_own` is random (as in LoRA), so
    the adapter starts as the identity map of the layer and still receives gradients.

    Example:
        >>> a = LowRankAdapter(16, 32, own_columns=4, conv=False)
        >>> a(torch.randn(2, 16), beta=torch.zeros(32, 0)).abs().sum().item()
        0.0
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        own_columns: int,
        shared_columns: int = 0,
        stride: tuple[int, int] | int = 1,
        conv: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shared_columns = shared_columns
        self.stride = stride
        self.conv = conv
        self.beta_own = nn.Parameter(torch.zeros(out_features, own_columns, device=device, dtype=dtype))
        self.gamma = nn.Parameter(
            torch.zeros(in_features, shared_columns + own_columns, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero `beta_own` and the shared part of `gamma`; orthonormal columns for the own part of `gamma`.

        With orthonormal `gamma_own` a first step on `beta_own` moves the adapter exactly as it moves a
        full `alpha` restricted to those input directions, so one lr means the same for both forms
        (Kaiming-uniform columns have squared norm 1/3: the factored form would train 3x slower).
        """
        nn.init.zeros_(self.beta_own)
        nn.init.zeros_(self.gamma)
        own = self.gamma[:, self.shared_columns :]
        if own.numel() and not own.is_meta:
            with torch.no_grad():  # QR in float32: it has no bf16/fp16 kernel
                own.copy_(nn.init.orthogonal_(torch.empty(own.shape, device=own.device)))

    @property
    def width(self) -> int:
        """Basis columns this domain reads: shared ones, then its own."""
        return self.gamma.shape[1]

    def basis(self, beta: torch.Tensor) -> torch.Tensor:
        """This domain's columns: the shared prefix it was built on, then its own."""
        if self.shared_columns > beta.shape[1]:
            raise RuntimeError(
                f"domain was built on {self.shared_columns} basis columns but the layer holds {beta.shape[1]}; "
                "load the basis.safetensors that belongs to this family"
            )
        # Always a contiguous (out, k + m) tensor with the same bytes whatever the total width of
        # `beta`, so old domains stay bit-identical when columns are appended; no copy when one
        # part is empty (a fresh domain, or one fully expressed on the shared basis).
        if self.shared_columns == 0:
            return self.beta_own
        if self.beta_own.shape[1] == 0:
            return beta[:, : self.shared_columns].contiguous()
        return torch.cat([beta[:, : self.shared_columns], self.beta_own], dim=1)

    def weight(self, beta: torch.Tensor) -> torch.Tensor:
        """The adapter as an (out, in) matrix."""
        return self.basis(beta) @ self.gamma.T

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        basis = self.basis(beta)
        if self.conv:
            h = F.conv2d(x, self.gamma.T[:, :, None, None], stride=self.stride)
            return F.conv2d(h, basis[:, :, None, None])
        return F.linear(F.linear(x, self.gamma.T), basis)
