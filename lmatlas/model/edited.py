"""``model.edited(edit)``: a handle that runs a model under an edit without changing the model.

Every forward through the handle (``run``, ``forward``, ``generate``) enters the edit
for its duration only, so the original ``model`` keeps giving its own results, and
the two can be used side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmatlas.model.cache import ActivationCache
    from lmatlas.model.handle import Model


class EditedModel:
    """``model`` under ``edit``; anything not overridden here is the model's own attribute."""

    def __init__(self, model: "Model", edit: Any):
        self.model = model
        self.edit = edit
        model.replacements(edit)  # check the edit against the model now, before any compute

    def run(self, inputs, **kwargs: Any) -> "ActivationCache":
        with self.model.edit(self.edit):
            return self.model.run(inputs, **kwargs)

    def forward(self, inputs) -> torch.Tensor:
        with self.model.edit(self.edit):
            return self.model.forward(inputs)

    def generate(self, inputs, max_new_tokens: int = 32, **kwargs: Any) -> Any:
        return self.model.generate(inputs, max_new_tokens, edit=self.edit, **kwargs)

    def card(self) -> dict[str, Any]:
        with self.model.edit(self.edit):
            return self.model.card()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __repr__(self) -> str:
        described = self.edit.describe() if hasattr(self.edit, "describe") else self.edit
        return f"EditedModel({self.model!r}, edit={described})"
