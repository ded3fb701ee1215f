"""The edit playground's requests: heads and neurons to ablate, scale or clamp, turned into an
:class:`~lmatlas.edit.Edit` and run with :meth:`Model.generate(edit=..., compare=True)
<lmatlas.model.handle.Model.generate>`.

A request lists interventions by kind; the item schema of each kind is built from
:data:`lmatlas.edit.forms.FORMS` (the table the command line reads too), so nothing is
reimplemented here::

    {"prompt": "Once upon a time", "max_new_tokens": 24,
     "interventions": [{"kind": "ablate", "target": "L5.H3"},
                       {"kind": "scale", "target": "L2.N10", "factor": 0.5},
                       {"kind": "set", "target": "L0.N3", "value": 4.0}]}

Targets are a head (``L5.H3``: its ``attn.z`` slice) or a neuron (``L12.N1031``: its
``mlp.act``), checked against the atlas's model before any compute: outside the grammar
is 422, past the model's sizes 404 (the valid range in the message). The page's URL
carries the same edit (``/edit?ablate=L5.H3&scale=L2.N10:0.5&set=L0.N3:4``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, create_model

from lmatlas.decode.token_text import token_texts
from lmatlas.edit import Edit
from lmatlas.edit.forms import FORMS, Form
from lmatlas.errors import InputError
from lmatlas.infer.decoding.names import STRATEGY_NAMES
from lmatlas.infer.policies import KV_POLICIES, check_inputs, implied_policy
from lmatlas.web import names
from lmatlas.web.errors import Malformed
from lmatlas.web.schemas import Prompt

if TYPE_CHECKING:
    from lmatlas.model.arch import HeadLayout
    from lmatlas.model.handle import Model
    from lmatlas.web.state import Limits

#: Most tokens a request may ask for (the schema's bound; ``Limits.new_tokens`` may be lower).
MAX_NEW_TOKENS = 256
DEFAULT_NEW_TOKENS = 24
TARGET_PATTERN = r"^L\d{1,6}\.(H\d{1,6}|N\d{1,9})$"  # names.HEAD_NAME or names.NEURON_NAME
_TARGET = dict(
    max_length=40, description="a head (L5.H3) or a neuron (L12.N1031)", json_schema_extra={"pattern": TARGET_PATTERN}
)


def item_model(form: Form) -> type[BaseModel]:
    """The request item of one intervention kind, built from its :class:`~lmatlas.edit.forms.Form`:
    ``{"kind", "target"}`` plus its number (bounded) or its choice."""
    fields: dict[str, Any] = {"kind": (Literal[form.kind], ...), "target": (str, Field(**_TARGET))}
    if form.value is not None:
        fields[form.value] = (float, Field(ge=-form.bound, le=form.bound))
    if form.choices is not None:
        name, options = form.choices
        fields[name] = (Literal[options], options[0])  # type: ignore[valid-type]
    return create_model(f"{form.cls}Item", __doc__=form.help, **fields)


#: One request item per kind of :data:`~lmatlas.edit.forms.FORMS` (the schema follows the table).
ITEMS = {kind: item_model(form) for kind, form in FORMS.items()}
Item = Annotated[Union[tuple(ITEMS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]


class EditSpec(BaseModel):
    interventions: list[Item] = Field(
        default_factory=list, max_length=64, description="applied in order; an empty list is the unedited model"
    )


#: The head-wise cache the playground offers: the CLI's defaults (``lmatlas generate --kv-budget``).
KV_DETECTORS, KV_SINK, KV_RECENT = ("full_context", "retrieval"), 4, 256

#: The KV policies the playground offers: the registry's (:mod:`lmatlas.infer.policies`) whose inputs
#: it can give (a budget chosen by the atlas's census scores, a SnapKV capacity).
KV_NAMES = tuple(kind.name for kind in KV_POLICIES.values() if not kind.playground)
KVName = Literal[KV_NAMES]  # type: ignore[valid-type]

#: The request fields that give each policy input (the registry's inputs, spelled for the API).
KV_FIELDS = {"plan": "kv_budget", "capacity": "kv_snap", "gates": "kv_gates"}

#: The request fields each offered policy needs (``{"hybrid": ["kv_budget", "kv_snap"], ...}``): the
#: playground builds its controls from this (``/api/live``'s ``kv_inputs``).
KV_REQUEST_FIELDS = {name: [KV_FIELDS[i] for i in KV_POLICIES[name].inputs] for name in KV_NAMES}

#: The strategies the playground offers: the registry's names (DeCoRe masks the atlas's top retrieval heads).
StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]


class EditRequest(Prompt, EditSpec):
    max_new_tokens: Optional[int] = Field(
        None,
        ge=1,
        le=MAX_NEW_TOKENS,
        description=f"tokens generated per continuation (default {DEFAULT_NEW_TOKENS}, or the server's cap if lower)",
    )
    chat: bool = Field(False, description="wrap the prompt in the tokenizer's chat template (instruct models)")
    strategy: StrategyName = Field(
        "greedy",
        description="decoding strategy of both continuations "
        "(speculative: prompt lookup; decore: the atlas's top 10 retrieval heads masked)",
    )
    kv: Optional[KVName] = Field(
        None,
        description="KV cache policy of both continuations, by registered name: "
        + "; ".join(
            f"{kind.name} ({kind.summary}; needs {kind.options(KV_FIELDS)})"
            for kind in KV_POLICIES.values()
            if not kind.playground
        )
        + ". Null: the one kv_budget or kv_snap implies (neither: the full cache). Not offered here: "
        + "; ".join(f"{kind.name} ({kind.playground})" for kind in KV_POLICIES.values() if kind.playground),
    )
    kv_snap: Optional[int] = Field(
        None,
        ge=33,
        le=1_000_000,
        description="SnapKV: prompt entries each KV head keeps (both continuations); null for the full cache",
    )
    kv_budget: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="head-wise cache: the fraction of KV heads that keep the whole context, chosen by the atlas's "
        f"census scores ({' + '.join(KV_DETECTORS)}); the others keep {KV_SINK} sink + {KV_RECENT} recent tokens. "
        "Null for the full cache",
    )


class ContinuationView(BaseModel):
    text: str
    ids: list[int]
    tokens: list[str] = Field(description="each generated token as it reads")
    logprob_plain: list[Optional[float]] = Field(description="log-probability of each token under the unedited model")
    logprob_edited: list[Optional[float]] = Field(description="... and under the edited model")
    stopped_by: Optional[str] = Field(description="the stop token that ended it early, if one did")


class EditComparison(BaseModel):
    prompt: str
    prompt_tokens: int
    max_new_tokens: int
    chat: bool
    edit: list[str] = Field(description="the edit's interventions, as lmatlas describes them")
    strategy: str = Field(description="the decoding strategy both continuations ran with")
    kv: dict[str, Any] = Field(description="the KV cache policy both ran with ({'method': 'default'}: full cache)")
    plain: ContinuationView
    edited: ContinuationView
    first_difference: Optional[int] = Field(description="first token index where the two differ; null if equal")


class EditFile(BaseModel):
    """The document :meth:`Edit.save` writes: ``Edit.load(path, model)`` reads it back."""

    format: str
    model: dict[str, Any]
    interventions: list[dict[str, Any]]


def make_intervention(item: BaseModel) -> Any:
    """The intervention a request item describes (through its form: nothing is reimplemented here)."""
    form = FORMS[item.kind]
    extra = {form.choices[0]: getattr(item, form.choices[0])} if form.choices is not None else {}
    return form.make(item.target, getattr(item, form.value) if form.value is not None else None, **extra)


def check_target(target: str, layout: "HeadLayout") -> None:
    """422 outside the grammar, 404 past the model's sizes (the message says the valid range)."""
    if names.HEAD_NAME.match(target):
        names.head(target, layout)
    elif names.NEURON_NAME.match(target):
        names.neuron(target, layout)
    else:
        raise Malformed(
            f"{target!r} is not a head or neuron name: expected L<layer>.H<head> (e.g. 'L5.H3') "
            "or L<layer>.N<neuron> (e.g. 'L12.N1031')."
        )


def build_edit(spec: EditSpec, layout: "HeadLayout") -> Edit:
    """The :class:`~lmatlas.edit.Edit` a request describes, every target checked first."""
    for item in spec.interventions:
        check_target(item.target, layout)
    return Edit(tuple(make_intervention(item) for item in spec.interventions))


def check_request(model: "Model", request: EditRequest, limits: "Limits") -> tuple[int, int]:
    """``(prompt tokens, new tokens)``, after refusing an empty or too long prompt or too many new tokens."""
    from lmatlas.model.generation import prompt_ids

    if not request.prompt.strip():
        raise Malformed("The prompt is empty: type some text.")
    new = request.max_new_tokens or min(DEFAULT_NEW_TOKENS, limits.new_tokens)
    if new > limits.new_tokens:
        raise Malformed(f"max_new_tokens is {new}; this explorer generates at most {limits.new_tokens}.")
    n = int(prompt_ids(model, request.prompt, request.chat)["input_ids"].shape[1])
    if n > limits.edit_tokens:
        raise Malformed(
            f"The prompt is {n} tokens; the edit playground takes at most {limits.edit_tokens}. Shorten it."
        )
    return n, new


def _view(model: "Model", continuation) -> dict[str, Any]:
    data = continuation.to_dict()
    data["tokens"] = token_texts(model.tokenizer, continuation.ids)
    return data


def strategy_for(request: EditRequest, retrieval_heads: list[str]) -> Any:
    """The strategy value a request names (DeCoRe masks ``retrieval_heads``, read from the atlas)."""
    from lmatlas.infer.decoding.strategies import DeCoRe, make_strategy

    if request.strategy == "decore":
        if not retrieval_heads:
            raise Malformed("DeCoRe needs the atlas's retrieval heads: this atlas has no census retrieval scores.")
        return DeCoRe(heads=tuple(retrieval_heads))
    return make_strategy(request.strategy)


def kv_policy(model: "Model", request: EditRequest, head_scores: list[dict[str, Any]]) -> Any:
    """The KV policy a request names (``kv``, or what ``kv_budget``/``kv_snap`` imply), built by the
    registry (:mod:`lmatlas.infer.policies`); a plan's full heads come from the atlas's census rows
    (``head_scores``: ``{"detector", "layer", "head", "score"}``). ``None``: the full cache."""
    given = {name for name, value in (("plan", request.kv_budget), ("capacity", request.kv_snap)) if value is not None}
    try:
        name = request.kv if request.kv is not None else implied_policy(given, KV_FIELDS, "kv")
        kind = check_inputs(name, given, KV_FIELDS, "kv")
        plan = census_plan(model, request.kv_budget, head_scores) if "plan" in kind.inputs else None
        return kind.make(plan=plan, capacity=request.kv_snap)
    except InputError as error:
        raise Malformed(str(error)) from None


def census_plan(model: "Model", budget: float, head_scores: list[dict[str, Any]]) -> Any:
    """The head-wise plan keeping ``budget`` of the KV heads full, ranked by the atlas's census rows."""
    import torch

    from lmatlas.infer.choose import combine, from_scores

    lay = model.layout
    tables = []
    for detector in KV_DETECTORS:
        table = torch.full((lay.n_layers, lay.n_heads), float("nan"))
        for row in head_scores:
            if row["detector"] == detector and row["score"] is not None:
                table[row["layer"], row["head"]] = float(row["score"])
        if torch.isnan(table).all():
            raise Malformed(
                f"A head-wise cache needs the atlas's {detector!r} census scores, which this atlas lacks: "
                "complete it with `lmatlas map`."
            )
        tables.append(table)
    method = "atlas:" + "+".join(KV_DETECTORS)
    return from_scores(model, combine(tables), budget, KV_SINK, KV_RECENT, method=method)


def compare(
    model: "Model",
    request: EditRequest,
    edit: Edit,
    prompt_tokens: int,
    new_tokens: int,
    retrieval_heads: list[str] = (),
    head_scores: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Plain and edited continuations side by side, with the request's strategy and KV cache
    (:func:`lmatlas.generate` with ``compare=True``; run it through the app's model gate)."""
    from lmatlas.infer.compose import generate

    kv = kv_policy(model, request, list(head_scores))
    result = generate(
        model,
        request.prompt,
        new_tokens,
        edit=edit,
        kv=kv,
        strategy=strategy_for(request, list(retrieval_heads)),
        compare=True,
        chat=request.chat,
    )
    return {
        "prompt": request.prompt,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": new_tokens,
        "chat": request.chat,
        "edit": result.edit,
        "strategy": result.strategy,
        "kv": result.kv,
        "plain": _view(model, result.plain),
        "edited": _view(model, result.edited),
        "first_difference": result.first_difference(),
    }


def saved(model: "Model", edit: Edit) -> dict[str, Any]:
    """The JSON document :meth:`Edit.save` writes for ``edit`` (through a temporary file: one code path)."""
    with tempfile.TemporaryDirectory(prefix="lmatlas-edit-") as folder:
        path = edit.save(Path(folder) / "playground.edit.json", model)
        return json.loads(path.read_text())
