"""Generation command: ``generate`` (plain, or side by side with an edited model).

    lmatlas generate [MODEL] "prompt" [--max-new-tokens N] [--chat] [--json]
    lmatlas generate [MODEL] "prompt" --ablate L5.H3 --scale L7.H2=2 --set L28.N931=8
    lmatlas generate [MODEL] "prompt" --steer 10 --positive pos.txt --negative neg.txt --alpha 4
    lmatlas generate [MODEL] "prompt" --edit kids.edit.json [--save-edit out.edit.json]

With no edit option it generates once and prints the continuation with each token's
log-probability. With an edit it generates twice (unedited, edited: the same prompt,
KV cache and strategy) and prints both continuations side by side, the differing tokens
highlighted, the first difference, and each token's log-probability under both models
(:func:`lmatlas.model.comparison.compare`). A KV policy (``--kv NAME`` or what
``--kv-budget``/``--kv-snap``/``--kv-gates`` imply, :mod:`lmatlas.infer.policies`) and
``--strategy`` combine with the edit (:func:`lmatlas.generate`). An empty continuation
says which stop token ended it.

Edit options (:class:`EditOptions`, parsed by :func:`edit_options`; checked for syntax
before the model loads, then against the model before anything runs):

=========================  ===============================================================
``--ablate T``             ``Ablate(T)`` (zero); repeatable  (these three: :data:`lmatlas.edit.forms.FORMS`)
``--scale T=F``            ``Scale(T, F)``; repeatable
``--set T=V``              ``Set(T, V)`` (clamp a neuron); repeatable
``--steer L``              ``Add("L{L}.resid.post", steering_vector(...), alpha)`` with
``--positive/--negative``  files of prompts, one per line, and ``--alpha`` (default 4)
``--edit FILE``            an edit saved by ``Edit.save`` (refused for another model)
``--save-edit FILE``       write the combined edit (JSON + safetensors beside it)
=========================  ===============================================================

The combined edit applies ``--edit`` first, then the options in the order of the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, app, load_model, out, print_json, run
from lmatlas.cli.generation_view import plain_continuation, show_comparison, show_generation, show_plain
from lmatlas.cli.infer_commands import ATLAS_OPT as KV_ATLAS_OPT
from lmatlas.cli.infer_commands import (
    KV_BUDGET_OPT,
    KV_GATES_OPT,
    KV_OPT,
    KV_SNAP_OPT,
    RANDOM_OPT,
    RECENT_OPT,
    SINK_OPT,
    KVOptions,
    show_kv_run,
)
from lmatlas.edit.forms import FORMS
from lmatlas.errors import InputError
from lmatlas.infer.decoding.names import DRAFTER_NAMES, STRATEGY_NAMES

if TYPE_CHECKING:
    from lmatlas.edit.edit import Edit
    from lmatlas.model.handle import Model

ARGS = typer.Argument(
    ...,
    metavar="[MODEL] PROMPT",
    show_default=False,
    help="An optional model (hub id, directory, .gguf, packaged name), then the prompt.",
)


@dataclass(frozen=True)
class EditOptions:
    """The edit options of one command line, syntax-checked (targets are checked against the model later).

    ``interventions`` holds ``(kind, target, value)`` per ``--ablate``/``--scale``/``--set``, read
    through :data:`lmatlas.edit.forms.FORMS`.
    """

    interventions: tuple[tuple[str, str, Optional[float]], ...] = ()
    steer: Optional[int] = None
    positive: Optional[Path] = None
    negative: Optional[Path] = None
    alpha: float = 4.0
    edit_file: Optional[Path] = None

    @property
    def empty(self) -> bool:
        return not (self.interventions or self.steer is not None or self.edit_file)


def edit_options(
    given: dict[str, list[str]],
    steer: Optional[int],
    positive: Optional[str],
    negative: Optional[str],
    alpha: float,
    edit_file: Optional[str],
) -> EditOptions:
    """Check the edit options' syntax and combinations (before any model is loaded); ``given`` maps each
    form's kind (``"scale"``) to the texts of its option."""
    if steer is None and (positive or negative):
        raise InputError("--positive/--negative build a steering vector: add --steer LAYER.")
    if steer is not None and not (positive and negative):
        raise InputError("--steer LAYER needs --positive FILE and --negative FILE (one prompt per line).")
    if not math.isfinite(alpha):
        raise InputError(f"--alpha {alpha}: the steering strength must be a finite number.")
    for name, path in (("--positive", positive), ("--negative", negative), ("--edit", edit_file)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{name} {path}: no such file.")
    interventions = tuple((kind, *FORMS[kind].parse(text)) for kind in FORMS for text in given.get(kind, ()))
    return EditOptions(
        interventions=interventions,
        steer=steer,
        positive=Path(positive) if positive else None,
        negative=Path(negative) if negative else None,
        alpha=alpha,
        edit_file=Path(edit_file) if edit_file else None,
    )


def _prompts(path: Path, option: str) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{option} {path}: the file holds no prompts (one per line).")
    return lines


def build_edit(model: "Model", options: EditOptions) -> "Edit | None":
    """The :class:`~lmatlas.edit.Edit` the options describe, checked against ``model`` (``None`` if no option)."""
    from lmatlas.edit import Add, Edit, steering_vector
    from lmatlas.model.sites import check_layer

    if options.empty:
        return None
    edit = Edit.load(options.edit_file, model) if options.edit_file else Edit()
    for kind, target, value in options.interventions:
        edit = edit | FORMS[kind].make(target, value)
    if options.steer is not None:
        layer = check_layer(options.steer, model.layout)
        edit.bind(model)  # report a bad target before the steering prompts run
        vector = steering_vector(
            model, _prompts(options.positive, "--positive"), _prompts(options.negative, "--negative"), layer
        )
        edit = edit | Add(f"L{layer}.resid.post", vector, alpha=options.alpha)
    edit.bind(model)  # every target, value and vector checked before generation
    return edit


def _split(args: list[str]) -> tuple[Optional[str], str]:
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise InputError(f"Expected [MODEL] PROMPT, got {len(args)} arguments: quote a prompt that contains spaces.")


def read_prompt(args: list[str], prompt_file: Optional[str]) -> tuple[Optional[str], str]:
    """``(model, prompt)`` from ``[MODEL] PROMPT`` or ``[MODEL] --prompt-file FILE``; empty prompts refused."""
    if prompt_file is not None:
        if len(args) > 1:
            raise InputError("--prompt-file replaces the PROMPT argument: give at most a MODEL before it.")
        path = Path(prompt_file)
        if not path.is_file():
            raise InputError(f"--prompt-file {prompt_file}: no such file.")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--prompt-file {prompt_file}: not UTF-8 text.") from None
        name = args[0] if args else None
    else:
        if not args:
            raise InputError("Give a PROMPT (or --prompt-file FILE).")
        name, prompt = _split(args)
    if not prompt.strip():
        raise InputError("The prompt is empty: give some text to continue.")
    return name, prompt


def strategy_value(name: Optional[str], drafter: Optional[str]) -> Any:
    """The strategy ``--strategy``/``--drafter`` name (checked before the model loads; ``None`` = greedy)."""
    from lmatlas.infer.decoding.strategies import Speculative, make_strategy

    if drafter is not None and name != "speculative":
        raise InputError(f"--drafter goes with --strategy speculative{'' if name is None else f', not {name}'}.")
    if drafter is not None and drafter not in DRAFTER_NAMES:
        raise InputError(f"Unknown drafter {drafter!r}: use one of {', '.join(DRAFTER_NAMES)}.")
    if name == "speculative":
        return Speculative(drafter=drafter or "prompt-lookup")
    return make_strategy(name)


@app.command()
def generate(
    args: list[str] = ARGS,
    ablate: list[str] = typer.Option([], FORMS["ablate"].option, help=FORMS["ablate"].help),
    scale: list[str] = typer.Option([], FORMS["scale"].option, help=FORMS["scale"].help),
    set_: list[str] = typer.Option([], FORMS["set"].option, help=FORMS["set"].help),
    steer: Optional[int] = typer.Option(None, "--steer", help="Layer whose resid.post gets a steering vector."),
    positive: Optional[str] = typer.Option(None, "--positive", help="File of positive prompts, one per line."),
    negative: Optional[str] = typer.Option(None, "--negative", help="File of negative prompts, one per line."),
    alpha: float = typer.Option(4.0, "--alpha", help="Steering strength (times the mean-difference vector)."),
    edit_file: Optional[str] = typer.Option(None, "--edit", help="An edit file saved by Edit.save (JSON)."),
    save_edit: Optional[str] = typer.Option(None, "--save-edit", help="Write the combined edit to this JSON file."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate (at least 1)."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Read the prompt from this text file."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template (instruct models)."),
    kv_budget: Optional[float] = KV_BUDGET_OPT,
    atlas: Optional[Path] = KV_ATLAS_OPT,
    sink: int = SINK_OPT,
    recent: int = RECENT_OPT,
    random_seed: Optional[int] = RANDOM_OPT,
    kv_snap: Optional[int] = KV_SNAP_OPT,
    kv: Optional[str] = KV_OPT,
    kv_gates: Optional[Path] = KV_GATES_OPT,
    strategy: Optional[str] = typer.Option(None, "--strategy", help=f"Decoding strategy: {', '.join(STRATEGY_NAMES)}."),
    drafter: Optional[str] = typer.Option(
        None, "--drafter", help=f"Speculative drafter: {', '.join(DRAFTER_NAMES)} (default prompt-lookup)."
    ),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Generate; with edit options, show the unedited and the edited continuation side by side.

    Edit options, a KV cache (--kv NAME, or --kv-budget / --kv-snap) and a decoding strategy (--strategy)
    combine: the edit applies to every forward, the cache holds every sequence, the strategy
    picks the tokens (see lmatlas.generate). A combination a part cannot serve is refused
    with its reason before any compute.
    """
    from lmatlas.infer.compose import generate as composed

    def body() -> Any:
        name, prompt = read_prompt(args, prompt_file)
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {max_new_tokens}: generate at least one token.")
        options = edit_options(
            {"ablate": ablate, "scale": scale, "set": set_}, steer, positive, negative, alpha, edit_file
        )
        if save_edit and options.empty:
            raise InputError("--save-edit needs an edit: add --ablate, --scale, --set, --steer or --edit.")
        kv_options = KVOptions(kv_budget, atlas, sink, recent, random_seed, kv_snap, kv, kv_gates)
        kv_options.check()
        chosen = strategy_value(strategy, drafter)
        model = load_model(name, dtype, device)
        edit = build_edit(model, options)
        policy = kv_options.policy(model)
        saved = str(edit.save(save_edit, model)) if save_edit else None
        header = {"model": model.provenance.source, "chat": chat, "max_new_tokens": max_new_tokens}
        if edit is not None:
            comparison = composed(
                model, prompt, max_new_tokens, edit=edit, kv=policy, strategy=chosen, chat=chat, compare=True
            )
            if as_json:
                return print_json({**header, **comparison.to_dict(), "saved_edit": saved})
            show_comparison(model, comparison, chat)
            if saved:
                out.print(f"Edit saved to {saved}")
            return None
        if chosen is None and policy is not None and not chat:
            return show_kv_run(model, prompt, policy, max_new_tokens, as_json)
        if chosen is None and policy is None:
            continuation = plain_continuation(model, prompt, max_new_tokens, chat)
            if as_json:
                return print_json({**header, "prompt": prompt, **continuation.to_dict()})
            return show_plain(model, prompt, continuation, chat)
        result = composed(model, prompt, max_new_tokens, kv=policy, strategy=chosen, chat=chat)
        if as_json:
            return print_json({**header, "prompt": prompt, **result.to_dict()})
        return show_generation(model, prompt, result, chat)

    run(body)
