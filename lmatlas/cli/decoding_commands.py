"""Decoding commands: ``train-draft-heads`` (draft heads for speculative decoding).

    lmatlas train-draft-heads [MODEL] [--heads 3] [--minutes 4] [--data chat|corpus] [--out FILE] [--json]

Self-distils Medusa-1 style draft heads on the model's own greedy answers to instructions (or
continuations of corpus windows; :mod:`lmatlas.infer.decoding.draft_heads`) and writes them where
``--strategy speculative --drafter heads`` looks for them (or to ``--out``).
"""

from __future__ import annotations

from typing import Optional

import typer

from lmatlas.cli.app import (
    DEVICE_OPT,
    DTYPE_OPT,
    JSON_OPT,
    MODEL_ARG,
    app,
    key_value_table,
    load_model,
    out,
    print_json,
    run,
)


@app.command("train-draft-heads")
def train_draft_heads_command(
    model: Optional[str] = MODEL_ARG,
    heads: int = typer.Option(3, "--heads", help="Draft heads (head k guesses the token k places after the next)."),
    minutes: float = typer.Option(4.0, "--minutes", help="Time budget for the whole run (data + training)."),
    steps: int = typer.Option(400, "--steps", help="At most this many optimiser steps."),
    prompts: int = typer.Option(64, "--prompts", help="Prompts the model answers or continues (the training data)."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens generated per prompt."),
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="chat (answers to a table of instructions; default "
        "with a chat template) or corpus (continuations of corpus windows).",
    ),
    out_path: Optional[str] = typer.Option(None, "--out", help="Where to write the heads (default: the cache)."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Train draft heads for speculative decoding (``generate --strategy speculative --drafter heads``)."""

    def body():
        from lmatlas.errors import InputError
        from lmatlas.infer.decoding.draft_heads import default_path, save_draft_heads, train_draft_heads

        if data is not None and data not in ("chat", "corpus"):
            raise InputError(f"--data {data!r}: use chat or corpus.")
        if heads < 1 or minutes <= 0 or steps < 1 or prompts < 1 or new_tokens <= heads + 1:
            raise InputError("--heads, --steps and --prompts must be >= 1, --minutes > 0, --new-tokens > heads + 1.")
        loaded = load_model(model, dtype, device)
        trained = train_draft_heads(
            loaded,
            heads,
            data=data,
            n_prompts=prompts,
            new_tokens=new_tokens,
            minutes=minutes,
            max_steps=steps,
            seed=seed,
        )
        path = save_draft_heads(trained, loaded, out_path or default_path(loaded))
        report = {"path": str(path), **trained.meta["train"]}
        if as_json:
            print_json(report)
        else:
            out.print(key_value_table("Draft heads", report))

    run(body)
