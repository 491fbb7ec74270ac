"""`AdapterModel`'s shared basis: each layer's `beta` and the operations that change it.

A mixin of `AdapterModel` (model.py), split out for size. `extend_basis` and `replace_basis` take the
model's lock and check the whole change before any of it is installed; the maths is in `basis.py`
(`check_extends`) and, on a live model, `compress.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .basis import check_extends


class BasisMixin:
    """`basis`, `extend_basis` and `replace_basis` of `AdapterModel` (see its docstring)."""

    # ----------------------------------------------------------------- shared basis
    def basis(self) -> dict[str, torch.Tensor]:
        """The shared basis `beta` of every layer that has one (C_out x K)."""
        return {
            n: m.beta
            for n, m in self.layers().items()
            if getattr(m, "beta", None) is not None and m.beta.shape[1]
        }

    def extend_basis(
        self,
        basis: dict[str, torch.Tensor],
        *,
        adapters: dict[str, dict[str, nn.Module]] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        """Install a basis that extends the current one (append-only), and optionally new adapters.

        Old domains read only the prefix they were built on, so their outputs do not change; a basis
        that is not an extension is refused. `adapters` maps domain -> layer -> adapter (a domain
        re-expressed on the longer basis); `history` is the basis operations that built `basis`.
        """
        with self._lock:
            current = self.basis()
            merged = dict(current)
            for name, beta in basis.items():
                if name in current and current[name].shape[1] > beta.shape[1]:
                    check_extends({name: beta}, current, "the new basis")  # a prefix of ours: keep ours
                else:
                    merged[name] = beta
            check_extends(current, merged, "the new basis")
            self._install_basis({n: b for n, b in merged.items() if b is not current.get(n)}, adapters or {})
            if history is not None:
                self.basis_history = list(history)

    def replace_basis(
        self,
        basis: dict[str, torch.Tensor],
        adapters: dict[str, dict[str, nn.Module]],
        *,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        """Install a re-factorised basis with every domain re-expressed on it (changes old domains'
        outputs by their reconstruction error; see `compress.refactorize`)."""
        with self._lock:
            missing = sorted(set(self._domains) - set(adapters))
            if missing:
                raise ValueError(f"replace_basis needs new adapters for every domain; missing {missing}")
            self._install_basis(basis, adapters)
            if history is not None:
                self.basis_history = list(history)

    def _install_basis(
        self, basis: dict[str, torch.Tensor], adapters: dict[str, dict[str, nn.Module]]
    ) -> None:
        layers = self.layers()
        unknown = sorted(n for n in basis if getattr(layers.get(n), "beta", None) is None)
        if unknown:
            raise ValueError(f"layers {unknown[:5]} have no shared basis in this model")
        for name, beta in basis.items():
            if beta.dim() != 2 or beta.shape[0] != layers[name].beta.shape[0]:
                raise ValueError(f"basis of {name}: shape {tuple(beta.shape)} does not fit the layer")
        for domain, by_layer in adapters.items():
            self._check_known(domain)
            for name in by_layer:
                if name not in layers:
                    raise ValueError(f"adapter for {name!r}, which is not an adapted layer")
        for name, beta in basis.items():
            layers[name].beta = beta
            if layers[name].fused is not None:
                layers[name].fused.clear()  # weights keyed on the old basis tensor are never served again
        for domain, by_layer in adapters.items():
            trainable = domain not in self._frozen
            for name, module in by_layer.items():
                module.requires_grad_(trainable).train(self.training and trainable)
                layers[name].adapters.put(domain, module, packed=not trainable)
