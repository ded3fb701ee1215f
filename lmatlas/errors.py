"""The errors lmatlas raises on bad input.

Every error says what was wrong *and* what to do about it. They all derive from
:class:`LmatlasError` so that a caller (the CLI, the web API) can catch one type
and show the message as is. Each class carries :class:`Help` (``symptom``, ``cause``,
``fix``): the documentation renders one page per class from it, and a test checks that
every error class has one.
"""

from __future__ import annotations

from typing import NamedTuple


class Help(NamedTuple):
    """What a user sees, why, and what to do: one documentation page per error class."""

    symptom: str
    cause: str
    fix: str


class LmatlasError(Exception):
    """Base class: a user-facing problem with a clear, actionable message."""

    help = Help(
        symptom='Any lmatlas error: one line on the CLI (exit status 2), a JSON object `{"error": {"type", "message"}}` under `--json`, an HTTP 4xx from the explorer.',
        cause="A user-facing problem with the input, a file or the model; never a bug in lmatlas (those raise ordinary exceptions with a traceback).",
        fix="Read the message: it names what was wrong and what to do. The subclasses below list the common cases.",
    )


class UnsupportedArchitectureError(LmatlasError):
    """The checkpoint's family has no entry in the ArchSpec table."""

    help = Help(
        symptom='`lmatlas load` or `lmatlas.load(...)` stops with "model_type ... has no ArchSpec".',
        cause="The checkpoint's family is not in lmatlas's declarative family table (`lmatlas.model.families`).",
        fix="`lmatlas.supported_model_types()` lists the supported families; a new family is one table entry plus a test.",
    )


class ModelFileError(LmatlasError):
    """A model source is missing, unreadable or corrupt."""

    help = Help(
        symptom='Loading stops with "No model at ...", "not a GGUF file" or "corrupt".',
        cause="The path does not exist, the file is truncated or damaged, or a hub id cannot be reached offline.",
        fix="Check the path; download the model again; pass a local directory or `.gguf` file when offline.",
    )


class NotACausalLMError(LmatlasError):
    """The checkpoint is not a decoder-only causal language model."""

    help = Help(
        symptom='Loading stops with "... has no language-model head".',
        cause="The checkpoint is an encoder, a classifier or a base model without `lm_head`: lmatlas maps decoder-only causal LMs.",
        fix="Load the `*ForCausalLM` checkpoint of the model.",
    )


class SiteError(LmatlasError, KeyError):
    """A site name, layer, head or neuron index is malformed or out of range."""

    help = Help(
        symptom='"Unknown site component \'attn.zz\'", "Head 9 is out of range at layer 3", "Position @99 ... is never reached".',
        cause="A site, target or position does not exist in this model (layer, head, KV head or neuron past its size, or a misspelling).",
        fix="Use the grammar `L12.attn.z`, `L5.H3`, `L5.H3.q`, `L5.KV1.k`, `L12.N1031` with `@positions`; `lmatlas sites` lists every site of a model.",
    )

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class FidelityError(LmatlasError):
    """A fidelity check failed: hooks changed the forward pass or a decomposition broke."""

    help = Help(
        symptom="`lmatlas check` fails: a hooked forward differs from the plain forward, or per-head writes do not sum to the attention output.",
        cause="A family's ArchSpec entry does not match the module it describes (a wrong path, norm kind or head layout).",
        fix="Report it with the model id; `lmatlas check MODEL --json` shows which check failed and by how much.",
    )


class AtlasError(LmatlasError):
    """An atlas file is missing, not an atlas, from another model, or cannot be written."""

    help = Help(
        symptom='"No atlas at ...", "not an lmatlas atlas", "was made for another model", "refusing to mix".',
        cause="The atlas file is missing, is another DuckDB file, belongs to another model, or was built with other settings.",
        fix="Build the atlas of this model with `lmatlas map MODEL --out FILE`; an interrupted build resumes with the same command.",
    )


class AtlasParamsError(AtlasError, ValueError):
    """An atlas build was given a parameter name it does not know, or a value of the wrong type."""

    help = Help(
        symptom='`build_atlas(..., params={...})` stops with "Unknown atlas parameter(s) ..." or "must be int".',
        cause="A parameter name that is not a field of `lmatlas.atlas.params.AtlasParams` (often a typo), or a value of another type.",
        fix="Use the names and types the message lists (`AtlasParams` documents each one and its default).",
    )


class HookOrderError(LmatlasError):
    """Hook sessions were left in another order than the reverse of the one they were entered in."""

    help = Help(
        symptom='Leaving a `with model.hooked(...)` block raises "sessions were left in another order".',
        cause="Hook sessions were exited out of order (e.g. entered with `__enter__` by hand and closed crosswise).",
        fix="Nest sessions with `with` blocks: they unwind in reverse order by construction.",
    )


class InputError(LmatlasError, ValueError):
    """Inputs to a forward or to generation are malformed (empty text, wrong dtype, no tokenizer)."""

    help = Help(
        symptom='"The prompt is empty", "The prompt has 25,000 tokens; this model\'s context is 8,192", "not a KV policy", "decodes greedily".',
        cause="Inputs to a forward or to generation are malformed, too long for the model, or a combination a part cannot serve.",
        fix="Follow the message: shorten the prompt, pass the named type, or drop the option the strategy refuses (see the combinations table of `lmatlas.generate`).",
    )


class DecodeError(LmatlasError):
    """A decoding request is malformed (bad norm mode, k, vector shape)."""

    help = Help(
        symptom='A decoding call stops with "k=... is out of range" or "Unknown norm mode".',
        cause="A decoding request names a bad `k`, norm mode or vector shape.",
        fix="Use `k` in 1..vocabulary size and a norm mode of `lmatlas.decode.vocab`; vectors are `[..., d_model]`.",
    )


class AttentionStatsError(LmatlasError, ValueError):
    """Bad arguments to ``attention_stats``, or a model whose attention cannot be streamed."""

    help = Help(
        symptom="`attention_stats` stops before running.",
        cause="Bad arguments to the streaming attention statistics, or a model whose attention cannot be streamed.",
        fix="Check the reduction and window arguments the message names.",
    )


class NoOrdinalTokensError(LmatlasError):
    """The tokenizer has too few single-token items in every requested ordinal sequence."""

    help = Help(
        symptom='The successor-head census stops with "too few single-token items".',
        cause="The tokenizer splits most ordinal items (numbers, days, months, letters) into several tokens.",
        fix="Skip the successor detector for this model (`--detectors` without `successor`).",
    )


class RegistryError(LmatlasError):
    """A detector (or another registered part) is registered twice or is malformed."""

    help = Help(
        symptom='Importing a plug-in raises "registered twice".',
        cause="A detector or another registered part uses a name that is already taken, or is malformed.",
        fix="Give the part a unique name.",
    )


class EditError(LmatlasError):
    """An edit is malformed or does not fit the model (bad value, wrong vector size, another model's file)."""

    help = Help(
        symptom='"Scale factor must be finite", "vector of size 576 expected", "was made for another model".',
        cause="An edit's value does not fit its target, or an edit file was saved for another model.",
        fix="Fix the value the message names; an edit names heads and neurons of one model and does not transfer.",
    )


class TaskError(LmatlasError):
    """A causal task is malformed: answers that are not one token, misaligned prompts, an empty file."""

    help = Help(
        symptom='A causal task stops with "answer ... is not one token" or "prompts of different lengths".',
        cause="A task's prompts and answers are misaligned, or an answer is several tokens.",
        fix="Give answers that are single tokens (with their leading space) and clean/corrupt prompts of equal length.",
    )


class ExplorerError(LmatlasError):
    """The web explorer cannot serve a request as asked (no model attached, prompt too long, no diff)."""

    help = Help(
        symptom='The explorer answers 4xx: "needs --model", "prompt too long", "no second atlas".',
        cause="A request asks for something this explorer instance cannot serve as started.",
        fix="Start it with the option the message names (`lmatlas serve FILE --model MODEL`, `--diff B`).",
    )


class ModelBusyError(ExplorerError):
    """The live model's request queue is full: retry in a moment."""

    help = Help(
        symptom='The explorer answers 503 "the model is busy".',
        cause="The live model's request queue is full.",
        fix="Retry in a moment, or start the explorer with a longer queue.",
    )


class DraftHeadsError(LmatlasError):
    """Draft heads are missing, unreadable, or were trained for another model."""

    help = Help(
        symptom='`generate --strategy speculative --drafter heads` stops with "No draft heads for ..." or "trained for '
        'another model".',
        cause="No heads file was trained for this model yet, the file is damaged, or it belongs to another model.",
        fix="Train heads for this model with `lmatlas train-draft-heads MODEL` (or pass the path of its heads file).",
    )


class DictionaryError(LmatlasError, ValueError):
    """A sparse dictionary (SAE, transcoder) or its training does not fit: bad k, width, site, file or model."""

    help = Help(
        symptom='`lmatlas features ...` stops with "k=64 must be below the 32 latents", "L15.attn.pattern cannot take a dictionary", "was made for another model" or "NaN at L15.resid.post".',
        cause="A dictionary's sizes do not match its site, its site is not a vector site, its file belongs to another model or site, or the activations it would train on are not finite or would not fit on disk.",
        fix="Follow the message: pick k below the number of latents, a residual or MLP site (`L15.resid.post`, `L15.mlp.in`/`mlp.out`), the model and site the file records, or free the disk space it names.",
    )
