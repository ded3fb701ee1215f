"""An :class:`Edit`: interventions composed with ``|``, applied in order, saved as JSON + safetensors.

>>> edit = Ablate("L5.H3") | Set("L28.N931", 8.0)                  # doctest: +SKIP
>>> with model.edit(edit):                                         # doctest: +SKIP
...     model.generate("Once upon a time")
>>> edited = model.edited(edit)          # a handle; `model` stays untouched   # doctest: +SKIP
>>> edit.save("kids.edit.json", model)   # tensors go to kids.edit.safetensors  # doctest: +SKIP

Order: interventions apply left to right (on the same site, the right one sees the
left one's result), after any replacement of an enclosing hook session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from lmatlas.edit.interventions import INTERVENTIONS, Intervention
from lmatlas.errors import EditError
from lmatlas.model.provenance import check_made_for, identity
from lmatlas.model.replacement import BoundReplacement

if TYPE_CHECKING:
    from lmatlas.edit.stats import AblationStats
    from lmatlas.model.handle import Model

FORMAT = "lmatlas.edit/1"


@dataclass(frozen=True)
class Edit:
    """An ordered tuple of interventions (a value: compose with ``|``, apply anywhere a replacement goes)."""

    interventions: tuple[Intervention, ...] = ()
    stats: Any = None  # AblationStats or an Atlas for mean/resample ablation (default: the model's corpus)

    def __or__(self, other: "Edit | Intervention") -> "Edit":
        more = other.interventions if isinstance(other, Edit) else (other,)
        if not all(isinstance(i, Intervention) for i in more):
            raise EditError(f"Only interventions and edits compose with |, got {type(other).__name__}.")
        return Edit(
            self.interventions + tuple(more), self.stats if self.stats is not None else getattr(other, "stats", None)
        )

    def __iter__(self) -> Iterator[Intervention]:
        return iter(self.interventions)

    def __len__(self) -> int:
        return len(self.interventions)

    def with_stats(self, stats: Any) -> "Edit":
        """The same edit, taking mean/resample statistics from ``stats`` (an Atlas or AblationStats)."""
        return Edit(self.interventions, stats)

    def bind(self, model: "Model", stats: "AblationStats | None" = None) -> list[BoundReplacement]:
        """Check every intervention against ``model`` (before any compute) and bind them, in order."""
        if stats is None and self.stats is not None:
            stats = self._resolve_stats(model)
        out: list[BoundReplacement] = []
        for intervention in self.interventions:
            out.extend(intervention.bind(model, stats))
        return out

    def _resolve_stats(self, model: "Model") -> "AblationStats":
        from lmatlas.edit.stats import AblationStats, stats_from_atlas

        if isinstance(self.stats, AblationStats):
            return self.stats
        return stats_from_atlas(self.stats, model)

    def describe(self) -> list[str]:
        """One line per intervention, e.g. ``"Ablate('L5.H3', how='zero')"`` (what provenance records)."""
        return [i.describe() for i in self.interventions]

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path, model: "Model") -> Path:
        """Write ``path`` (JSON) and, if any intervention holds tensors, ``<stem>.safetensors`` beside it."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        items = []
        for i, intervention in enumerate(self.interventions):
            params = {}
            for f in fields(intervention):
                value = getattr(intervention, f.name)
                if isinstance(value, torch.Tensor):
                    key = f"{i}.{f.name}"
                    tensors[key] = value.detach().cpu().contiguous()
                    params[f.name] = {"tensor": key}
                elif isinstance(value, torch.nn.Module):
                    raise EditError(f"{intervention.describe()} holds a module: save its state_dict yourself.")
                elif f.name == "source" and value is not None:
                    raise EditError(
                        f"{intervention.describe()}: save the source tensor, not a cache "
                        "(Patch(target, cache['L5.attn.z']))."
                    )
                else:
                    params[f.name] = list(value) if isinstance(value, tuple) else value
            items.append({"type": type(intervention).__name__, **params})
        document = {"format": FORMAT, "model": {**identity(model), "family": model.family}, "interventions": items}
        if tensors:
            document["tensors"] = path.with_suffix(".safetensors").name
            save_file(tensors, str(path.with_suffix(".safetensors")))
        path.write_text(json.dumps(document, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model: "Model") -> "Edit":
        """Read an edit saved by :meth:`save`; refuse one made for another model (its card hash differs)."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise EditError(f"Cannot read edit file {path}: {error}.") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise EditError(f"{path} is not an lmatlas edit file (expected format {FORMAT!r}).")
        check_made_for(
            document.get("model", {}),
            model,
            str(path),
            EditError,
            "an edit names heads and neurons of one model and does not transfer.",
        )
        tensors = load_file(str(path.with_name(document["tensors"]))) if document.get("tensors") else {}
        interventions = []
        for item in document.get("interventions", []):
            kind = INTERVENTIONS.get(item.get("type"))
            if kind is None:
                raise EditError(
                    f"Unknown intervention {item.get('type')!r} in {path}: known: {', '.join(INTERVENTIONS)}."
                )
            params = {}
            for key, value in item.items():
                if key == "type":
                    continue
                if isinstance(value, dict) and "tensor" in value:
                    value = tensors[value["tensor"]]
                elif key == "steps" and isinstance(value, list):
                    value = tuple(value)
                params[key] = value
            interventions.append(kind(**params))
        edit = cls(tuple(interventions))
        edit.bind(model)  # validate now, not at the first forward
        return edit


def as_edit(value: "Edit | Intervention") -> Edit:
    return value if isinstance(value, Edit) else Edit((value,))
