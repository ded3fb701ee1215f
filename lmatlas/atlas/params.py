"""The settings of an atlas build: one frozen dataclass, every default in one place.

    params = AtlasParams.from_dict({"corpus_sequences": 8, "top_k": 10})  # the rest: defaults
    build_atlas(model, "a.duckdb", params={"corpus_sequences": 8})         # the same, as a dict
    ctx.params.top_k                                                     # what a stage reads

A build stamps :meth:`AtlasParams.to_dict` on the file's ``meta`` and on every unit's
``runs`` row (as the dict of earlier versions, which had only some of these names: an
atlas written before a name existed was built with its default, :meth:`from_stored`).
A name that is not a field is refused with an :class:`~lmatlas.errors.AtlasParamsError`
listing the known ones, so a typo cannot silently build with the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from lmatlas.errors import AtlasParamsError

DEFAULT_CORPUS = "stdlib-docstrings"


@dataclass(frozen=True)
class AtlasParams:
    """Every setting a stage reads; ``ctx.params`` of a build.

    Attributes:
        corpus_sequences: corpus windows the corpus stages read (``activations``,
            ``neuron_contexts``, ``head_windows``; ``lens`` and ``importance`` read their first ones).
        seq_len: tokens per corpus window.
        batch: windows per forward in the corpus pass and the labels stage.
        top_k: tokens per neuron ranking (``neurons``) and per feature (``features``).
        top_contexts: top-activating corpus positions kept per neuron (``activations``,
            ``neuron_contexts``) and per feature.
        importance_sequences: corpus windows the ``importance`` stage scores on.
        importance_method: ``"attribution"`` (one backward, verified by ablation) or
            ``"mean-ablation"`` (one forward per component).
        importance_verify: components per layer whose attribution is checked by a real ablation.
        ov_sources: seeded source tokens pushed through each head's OV circuit (``ov``).
        ov_k: top/bottom outputs a source must reach for the copying/suppression scores.
        ov_pairs: strongest source→output pairs stored per head.
        lens_sequences: corpus windows the logit lens averages over (``lens``).
        head_windows: corpus windows kept per head (``head_windows``).
        head_window_span: keys of attention stored per kept window.
        label_steer: prompts steered per neuron by the ``labels`` stage.
        feature_links: strongest links stored per dictionary feature (``features``).
        corpus: the corpus read (a path, or the built-in ``stdlib-docstrings``); set by the build.
    """

    corpus_sequences: int = 16
    seq_len: int = 128
    batch: int = 4
    top_k: int = 20
    top_contexts: int = 5
    importance_sequences: int = 2
    importance_method: str = "attribution"
    importance_verify: int = 8
    ov_sources: int = 256
    ov_k: int = 10
    ov_pairs: int = 10
    lens_sequences: int = 4
    head_windows: int = 3
    head_window_span: int = 128
    label_steer: int = 4
    feature_links: int = 8
    corpus: str = DEFAULT_CORPUS

    @classmethod
    def from_dict(cls, values: "Mapping[str, Any] | AtlasParams | None" = None) -> "AtlasParams":
        """The defaults with ``values`` (names as the fields) replacing some.

        Raises:
            AtlasParamsError: a name that is not a field, or a value of the wrong type.
        """
        if isinstance(values, AtlasParams):
            return values
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise AtlasParamsError(f"Unknown atlas parameter(s) {', '.join(unknown)}. Known: {', '.join(fields)}.")
        for name, value in values.items():
            kind = type(getattr(cls, name))
            if not isinstance(value, kind) or isinstance(value, bool):
                raise AtlasParamsError(
                    f"Atlas parameter {name}={value!r} must be {kind.__name__} (default {getattr(cls, name)!r})."
                )
        return cls(**values)

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """The full settings an atlas's stored ``params`` stand for (names it lacks: their defaults), as a dict."""
        return {**cls().to_dict(), **dict(values)}

    def to_dict(self) -> dict[str, Any]:
        """``{name: value}`` for every field (what the atlas stores)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "AtlasParams":
        """A copy with ``changes`` (checked as :meth:`from_dict` checks them)."""
        return AtlasParams.from_dict({**self.to_dict(), **changes})
