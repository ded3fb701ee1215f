"""The errors lmatlas raises on bad input.

Every error says what was wrong *and* what to do about it. They all derive from
:class:`LmatlasError` so that a caller (the CLI, the web API) can catch one type
and show the message as is.
"""

from __future__ import annotations


class LmatlasError(Exception):
    """Base class: a user-facing problem with a clear, actionable message."""


class UnsupportedArchitectureError(LmatlasError):
    """The checkpoint's family has no entry in the ArchSpec table."""


class ModelFileError(LmatlasError):
    """A model source is missing, unreadable or corrupt."""


class NotACausalLMError(LmatlasError):
    """The checkpoint is not a decoder-only causal language model."""


class SiteError(LmatlasError, KeyError):
    """A site name, layer, head or neuron index is malformed or out of range."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class FidelityError(LmatlasError):
    """A fidelity check failed: hooks changed the forward pass or a decomposition broke."""


class AtlasError(LmatlasError):
    """An atlas file is missing, not an atlas, from another model, or cannot be written."""


class HookOrderError(LmatlasError):
    """Hook sessions were left in another order than the reverse of the one they were entered in."""


class InputError(LmatlasError, ValueError):
    """Inputs to a forward or to generation are malformed (empty text, wrong dtype, no tokenizer)."""


class DecodeError(LmatlasError):
    """A decoding request is malformed (bad norm mode, k, vector shape)."""


class AttentionStatsError(LmatlasError, ValueError):
    """Bad arguments to ``attention_stats``, or a model whose attention cannot be streamed."""


class NoOrdinalTokensError(LmatlasError):
    """The tokenizer has too few single-token items in every requested ordinal sequence."""


class RegistryError(LmatlasError):
    """A detector (or another registered part) is registered twice or is malformed."""


class EditError(LmatlasError):
    """An edit is malformed or does not fit the model (bad value, wrong vector size, another model's file)."""


class TaskError(LmatlasError):
    """A causal task is malformed: answers that are not one token, misaligned prompts, an empty file."""


class ExplorerError(LmatlasError):
    """The web explorer cannot serve a request as asked (no model attached, prompt too long, no diff)."""


class ModelBusyError(ExplorerError):
    """The live model's request queue is full: retry in a moment."""
