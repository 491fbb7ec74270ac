"""The served model's domains: describing them, the batched forward, hot-add and removal.

The forward and a removal take one lock in turn, so a removal waits for the forward in flight and a
batch never loses a domain halfway; images whose domain was unloaded before their batch ran get 404.
A hot-add needs no such lock (`AdapterModel.load_domain` publishes the domain in one step), but admin
changes run one at a time. A hot-add is checked before the model is touched: a source or domain that
does not exist is 404, a family built on other backbone weights (or another adapter layout) is 409.
With `mixed_precision` the forward runs under autocast (bf16 or fp16); the domains' tensors stay as loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .serve_errors import ServeError
from .sources import pin_source
from .transforms import resolve_data_config

if TYPE_CHECKING:
    from .model import AdapterModel
    from .serve_batching import Item

logger = logging.getLogger(__name__)
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # as TrainConfig.mixed_precision


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype `mixed_precision` names (None for `no`); a ValueError for another name."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r} must be one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[mixed_precision]


def autocast(mixed_precision: str, device_type: str) -> torch.autocast:
    """`torch.autocast` on `device_type` in the dtype `mixed_precision` names (disabled for `no`)."""
    dtype = autocast_dtype(mixed_precision)
    return torch.autocast(device_type, dtype, enabled=dtype is not None)


def unknown_domain(name: str, loaded: Sequence[str]) -> ServeError:
    pick = f"(loaded: {', '.join(loaded)}); pick one of them, or " if loaded else "(none is); "
    route = "; to have the server route an image, leave its domain out (or send null or 'auto')"
    return ServeError(
        404,
        "unknown_domain",
        f"domain {name!r} is not loaded {pick}hot-add it with POST /v1/domains{'' if name else route}",
        loaded=list(loaded),
    )


class Domains:
    """The served model's domains and everything that reads or changes them.

    Args:
        model: the model being served (in eval mode).
        source: where its domains came from (reported by `describe`).
        revision: the revision they came from.
        mixed_precision: `no`, or the autocast dtype of the forward: `bf16` or `fp16`.
    """

    def __init__(
        self,
        model: AdapterModel,
        source: str | None = None,
        revision: str | None = None,
        mixed_precision: str = "no",
    ) -> None:
        autocast_dtype(mixed_precision)  # (checked before anything runs)
        self.model = model
        self.device = next(model.parameters()).device
        self.mixed_precision = mixed_precision
        self.forward_lock = threading.Lock()  # a forward or a removal, never both
        self.admin_lock = threading.Lock()  # one hot-add or removal at a time
        self._origin: dict[str, dict[str, Any]] = {
            d: {"source": source, "revision": revision} for d in model.domains
        }

    @property
    def names(self) -> list[str]:
        return self.model.domains

    def check(self, name: str) -> None:
        if name not in self.model.domains:
            raise unknown_domain(name, self.model.domains)

    def describe(self) -> list[dict[str, Any]]:
        """Every loaded domain: classes, labels, metrics, the data config its images get (resolved against
        the backbone's), origin, parameters, bytes."""
        out = []
        for name in self.model.domains:
            try:
                info = self.model.domain_info(name)
                cost = self.model.domain_cost(name)
            except KeyError:  # removed while we looked
                continue
            origin = self._origin.get(name, {})
            out.append(
                {
                    "name": name,
                    "num_classes": info.num_classes,
                    "labels": info.labels,
                    "metrics": info.metrics,
                    "data_config": resolve_data_config(self.model.pretrained_cfg, info.data_config),
                    "source": origin.get("source"),
                    "revision": origin.get("revision"),
                    "parameters": int(cost["parameters"]),
                    "bytes": int(cost["bytes"]),
                    "routable": name in self.model.signatures,  # can take images sent without a domain
                }
            )
        return out

    # ------------------------------------------------------------------ the forward
    def run(self, items: list[Item]) -> list[Any]:
        """One mixed-domain forward per input shape; per item its logits row (or a ServeError)."""
        results: list[Any] = [None] * len(items)
        with self.forward_lock:
            loaded = self.model.domains
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, item in enumerate(items):
                if item.domain in loaded:
                    by_shape.setdefault(tuple(item.x.shape), []).append(i)
                else:
                    results[i] = unknown_domain(item.domain, loaded)
            for idx in by_shape.values():
                domains = [items[i].domain for i in idx]
                x = torch.stack([items[i].x for i in idx]).to(self.device)
                with torch.inference_mode(), autocast(self.mixed_precision, self.device.type):
                    logits = self.model(x, domain=domains).float().cpu()
                widths = {d: self.model.domain_info(d).num_classes for d in set(domains)}
                for row, i in enumerate(idx):
                    results[i] = logits[row, : widths[items[i].domain]]
        return results

    # ------------------------------------------------------------------ admin changes
    def hot_add(self, source: str, domain: str, revision: str | None, as_name: str | None) -> dict[str, Any]:
        """Load one domain of a family into the running model; returns its description once live."""
        from .config import check_domain_name

        for value in (domain, as_name):
            if value is not None:
                try:
                    check_domain_name(value)
                except ValueError as e:
                    raise ServeError(422, "invalid_domain_name", str(e)) from e
        try:
            source, revision = pin_source(source, revision)  # `org/name@rev`, as `adapterkit serve` takes it
        except ValueError as e:
            raise ServeError(422, "invalid_source", str(e)) from e
        target = as_name or domain
        with self.admin_lock:
            if target in self.model.domains:
                raise ServeError(
                    409,
                    "domain_exists",
                    f"domain {target!r} is already loaded: DELETE /v1/domains/{target} first, or pass "
                    "another as_name",
                )
            pinned = self._check_source(source, domain, revision)
            try:
                self.model.load_domain(source, domain, revision=pinned, as_name=as_name)
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise ServeError(422, "invalid_family", f"cannot load {domain!r} from {source}: {e}") from e
            self._origin[target] = {"source": source, "revision": pinned or revision}
        if target not in self.model.signatures and len(self.model.signatures):
            logger.warning(
                "hot-added %r has no routing signature: images sent without a domain get 409 no_signature "
                "until it is removed or refitted (fit_signature)",
                target,
            )
        return next(d for d in self.describe() if d["name"] == target)

    def _check_source(self, source: str, domain: str, revision: str | None) -> str | None:
        """404 for a missing source or domain, 409 for another backbone; the commit to load from."""
        from .format import read_config
        from .load import check_backbone
        from .sources import open_source

        try:
            src = open_source(source, revision=revision, cache_fallback=False)
            config = read_config(src.fetch, src.files, [domain], where=src.label)
        except FileNotFoundError as e:
            raise ServeError(404, "source_not_found", f"{e}") from e
        except KeyError as e:
            raise ServeError(404, "domain_not_found", str(e.args[0]) if e.args else str(e)) from e
        except ConnectionError as e:
            raise ServeError(502, "source_unreachable", str(e)) from e
        except (ValueError, NotADirectoryError) as e:  # (a file where a family folder should be)
            raise ServeError(422, "invalid_source", f"{source}: {e}") from e
        try:
            name = self.model.backbone_name
            advice = (
                "This service adds only domains trained on its own backbone weights"
                f"{f' ({name!r})' if name else ''}: add one of those."
            )
            check_backbone(self.model, config, src.label, force=False, advice=advice)
        except ValueError as e:
            raise ServeError(409, "backbone_mismatch", str(e)) from e
        return src.revision  # the commit a Hub source was pinned to (None for a folder)

    def remove(self, name: str) -> None:
        """Unload a domain once the forward in flight (if any) is done."""
        with self.admin_lock:
            with self.forward_lock:
                if name not in self.model.domains:
                    raise unknown_domain(name, self.model.domains)
                self.model.unload_domain(name)
            self._origin.pop(name, None)
