"""`AdapterModel`'s files and Hub entry points, and what a domain costs.

A mixin of `AdapterModel` (model.py), split out for size. `save_pretrained`, `from_pretrained`,
`push_to_hub` and `export_domain` override (or add to) huggingface_hub's `ModelHubMixin`, which
`AdapterModel` lists after this class so these win; each is a thin entry point that imports its stage
inside the method (`family.py`, `load.py`, `hub.py`, `export.py`), so importing the model stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import AdapterModel


class HubMixin:
    """`save_pretrained`, `from_pretrained`, `push_to_hub`, `export_domain`, `domain_state_dict` and
    `domain_cost` of `AdapterModel` (see its docstring)."""

    # ----------------------------------------------------------------- a domain's tensors
    def domain_state_dict(self, domain: str) -> dict[str, torch.Tensor]:
        """All of a domain's tensors (parameters and norm statistics): `layers.<layer>.<tensor>`, `head.<tensor>`."""
        self._check_known(domain)
        state = {}
        for layer_name, layer in self.layers().items():
            for key, t in layer.adapters.state_of(domain).items():
                state[f"layers.{layer_name}.{key}"] = t
        for key, t in self.heads[domain].state_dict().items():
            state[f"head.{key}"] = t
        if domain in self.signatures:
            for key, t in self.signatures[domain].state_dict().items():
                state[f"signature.{key}"] = t
        return state

    # ----------------------------------------------------------------- accounting
    def backbone_parameter_count(self) -> int:
        """Parameters of the backbone without its classifier (the paper's unit for "#par")."""
        return sum(p.numel() for n, p in self.backbone.named_parameters() if ".adapters." not in f".{n}")

    def domain_cost(self, domain: str) -> dict[str, float]:
        """Parameters and bytes `domain` adds, and their share of the backbone's parameters."""
        state = self.domain_state_dict(domain)
        params = sum(p.numel() for p in self.trainable_parameters(domain))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        backbone = self.backbone_parameter_count()
        return {"parameters": params, "bytes": nbytes, "fraction_of_backbone": params / backbone}

    # ----------------------------------------------------------------- export and files
    def export_domain(self, name: str) -> nn.Module:
        """A plain timm model for one domain with its adapters folded in (see `export.py`)."""
        from .export import export_domain

        return export_domain(self, name)

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        overwrite: bool = False,
        **push_kwargs: Any,
    ) -> str | None:
        """Write the family folder (`family.save_family`: the folder's other domains are kept; a family of
        another layout, on other weights or with a basis this model's does not extend is refused before
        anything is written, and so is a same-named domain of other content that this model did not load
        from or save to that folder, unless `overwrite=True`). With `push_to_hub=True` also push to
        `repo_id` (default: the folder's name), passing `push_kwargs` to `push_to_hub`, and return the
        commit URL."""
        if push_kwargs and not push_to_hub:
            raise TypeError(
                f"save_pretrained got {sorted(push_kwargs)}, which apply only with push_to_hub=True"
            )
        self._save_pretrained(Path(save_directory), overwrite=overwrite)
        return self.push_to_hub(repo_id or Path(save_directory).name, **push_kwargs) if push_to_hub else None

    def _save_pretrained(self, save_directory: Path, overwrite: bool = False) -> None:
        from .family import save_family

        save_family(self, save_directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> AdapterModel:  # type: ignore[override]
        """Load a family from a local folder or a Hub repo.

        Args:
            pretrained_model_name_or_path: a family folder or a Hub repo id.
            **kwargs: `domains` (load only these; only their files are downloaded; `[]` for none),
                `backbone` (timm name or module; default: the recorded backbone with its recorded
                weights), `backbone_weights` (a local file replacing a recorded one that moved), `force`,
                and the Hub's `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`.

        Returns the model in eval mode with every loaded domain frozen (see `set_trainable`).

        ModelHubMixin.from_pretrained would first probe for a config.json we do not write, so this goes
        straight to `_from_pretrained`.
        """
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> AdapterModel:  # type: ignore[override]
        from .load import HUB_KEYS, load_family

        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
        return load_family(
            cls, model_id, **{k: v for k, v in hub_kwargs.items() if v not in (None, False)}, **kwargs
        )

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        domains: list[str] | None = None,
        private: bool | None = None,
        branch: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        force: bool = False,
    ) -> str:
        """Publish domains (default: all) to a Hub repo, keeping the domains already there.

        Only the pushed domains' files, the basis, `adapterkit.json` and the model card are written;
        the backbone is never uploaded. `revision` is another name for `branch`, as in `upload_folder`.
        """
        from .hub import push_to_hub

        if branch is not None and revision is not None and branch != revision:
            raise ValueError(f"branch={branch!r} and revision={revision!r} disagree; pass one of them")
        return push_to_hub(
            self,
            repo_id,
            domains=domains,
            private=private,
            branch=branch or revision,
            commit_message=commit_message,
            token=token,
            force=force,
        )
