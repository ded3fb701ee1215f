"""Decoding commands: ``search`` (who writes a token) and ``lens`` (the logit lens).

    lmatlas search [MODEL] " dog" [--top N] [--json]   neurons and heads that promote a token, ranked
    lmatlas search [MODEL] --id 5024 [--json]          the same, by token id
    lmatlas lens [MODEL] "prompt" [--k K] [--json]     layers x positions: each layer's top token

Both take the model first when it is given (``lmatlas lens gemma3-270m "Hi"``); with
one argument it is the token / prompt and the packaged default model is used.

``search`` ranks, for token ``t`` with unembedding column ``u = final_gain * W_U[:, t]``:

* **neurons** by ``W_out[l][n] (* post-MLP norm gain) . u``: the logit a neuron adds
  to ``t`` per unit of activation (:func:`lmatlas.decode.neurons.output_directions`;
  a neuron with negative activations promotes the tokens ranked last: not shown);
* **heads** by the largest OV logit for ``t`` over every source token
  (:func:`lmatlas.decode.heads.promoting_heads`), with the source that achieves it
  and the mean over sources.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, app, load_model, out, print_json, run
from lmatlas.errors import LmatlasError

POSITION_WIDTH = 11  # characters a lens position column needs (a short token and its probability)

ARGS = typer.Argument(..., metavar="[MODEL] TEXT", help="An optional model (hub id, directory, .gguf, packaged "
                      "name), then the token / prompt.", show_default=False)


def _split(args: list[str], n_text: int) -> tuple[Optional[str], list[str]]:
    """``[MODEL] TEXT`` -> ``(model or None, texts)``; a clear error on a wrong count."""
    from lmatlas.decode.vocab import DecodeError

    if len(args) == n_text:
        return None, args
    if len(args) == n_text + 1:
        return args[0], args[1:]
    want = "[MODEL] TEXT" if n_text else "[MODEL] (with --id)"
    raise DecodeError(f"Expected {want}, got {len(args)} arguments: quote text that contains spaces.")


def _token_id(model, text: Optional[str], token_id: Optional[int]) -> int:
    from lmatlas.decode.vocab import DecodeError

    vocab = model.layout.d_vocab
    if token_id is not None:
        if not 0 <= token_id < vocab:
            raise DecodeError(f"Token id {token_id} is out of range: this model's vocabulary is 0..{vocab - 1}.")
        return token_id
    if model.tokenizer is None:
        raise DecodeError("This model has no tokenizer: give the token as --id N.")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise DecodeError(f"{text!r} is {len(ids)} tokens {pieces}, not one: search one token "
                          f"(mind the leading space: ' dog' vs 'dog') or pass --id.")
    return ids[0]


def promoting_neurons(model, token: int, top: int) -> list[tuple[int, int, float]]:
    """``[(layer, neuron, logit per unit activation), ...]``: the ``top`` neurons that promote ``token`` most.

    ``output_directions(l) @ W_U[:, token]`` for every layer: one column of the
    neurons' output logits (the same directions :mod:`lmatlas.decode.neurons` decodes).
    """
    import torch

    from lmatlas.decode.neurons import output_directions
    from lmatlas.decode.vocab import unembed_matrix

    column = unembed_matrix(model)[:, token].detach().float()  # [d_model]
    with torch.no_grad():
        scores = torch.stack([output_directions(model, layer) @ column for layer in range(model.layout.n_layers)])
    values, flat = torch.topk(scores.reshape(-1), min(top, scores.numel()))  # scores: [n_layers, d_mlp]
    d_mlp = scores.shape[1]
    return [(i // d_mlp, i % d_mlp, float(v)) for v, i in zip(values.tolist(), flat.tolist())]


@app.command()
def search(args: list[str] = ARGS, token_id: Optional[int] = typer.Option(None, "--id", help="Token id instead of "
           "text."), top: int = typer.Option(20, "--top", min=1, help="Rows shown."), as_json: bool = JSON_OPT,
           dtype: str = DTYPE_OPT, device: Optional[str] = DEVICE_OPT) -> None:
    """The neurons and heads that promote a token, ranked by the logit they add: from a model or an atlas FILE."""

    def body():
        if args and args[0].endswith(".duckdb"):
            return _search_atlas(args, token_id, top, as_json)
        from lmatlas.atlas.ranking import hit, ranked
        from lmatlas.decode.heads import promoting_heads
        from lmatlas.decode.token_text import token_text

        name, texts = _split(args, 0 if token_id is not None else 1)
        model = load_model(name, dtype, device)
        token = _token_id(model, texts[0] if texts else None, token_id)
        text = token_text(model.tokenizer, token)
        heads = promoting_heads(model, token)
        neurons = promoting_neurons(model, token, top)
        data = {
            "token": text, "id": token,
            "neurons": [{"neuron": f"L{l}.N{n}", "logit": v} for l, n, v in neurons],
            "heads": [{"head": f"L{l}.H{h}", "max_logit": mx, "source": token_text(model.tokenizer, src),
                       "source_id": src, "mean_logit": mean} for l, h, mx, src, mean in heads.ranked(top)],
        }
        data["results"] = ranked(
            [hit("neuron", l, n, v) for l, n, v in neurons]
            + [hit("head", l, h, mx, source=token_text(model.tokenizer, src)) for l, h, mx, src, _ in heads.ranked(top)],
            top)
        if as_json:
            return print_json(data)
        print_ranking(f"Neurons and heads promoting {text!r} (id {token}), by the logit they add", data["results"],
                      caption="neuron: per unit of activation; head: attending to its best source token")

    run(body)


def print_ranking(title: str, rows: list[dict], caption: str | None = None) -> None:
    """The one table of a token search (a model's or an atlas's): rank, kind, name, logit, source, top tokens."""
    from lmatlas.cli.tables import add_columns, column_width, shown, token_list

    table = Table(title=title, caption=caption, title_justify="left")
    add_columns(table, ["#", "kind", "name", "logit", "source"])
    with_tokens = any(row.get("top_tokens") for row in rows)
    if with_tokens:
        add_columns(table, ["top tokens"])
    width = column_width(out.width, 40, 1)
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["kind"], row["name"], f"{row['logit']:.3f}",
                 Text("" if row.get("source") is None else shown(row["source"]))]
        if with_tokens:
            cells.append(token_list(row.get("top_tokens") or [], width))
        table.add_row(*cells)
    out.print(table)


def _search_atlas(args: list[str], token_id: Optional[int], top: int, as_json: bool) -> None:
    """``lmatlas search FILE TEXT`` (or ``FILE --id N``): :meth:`Atlas.search`, printed like a model search."""
    from lmatlas.atlas.query import Atlas

    if len(args) != (1 if token_id is not None else 2):
        raise LmatlasError("Usage: lmatlas search ATLAS.duckdb TEXT (or: lmatlas search ATLAS.duckdb --id N)")
    query = token_id if token_id is not None else args[1]
    with Atlas.open(args[0]) as atlas:
        rows = atlas.search(query, limit=top).to_pylist()
    if as_json:
        return print_json({"atlas": args[0], "token": query, "results": rows})
    print_ranking(f"Neurons and heads promoting {query!r} in {args[0]}, by the logit they add", rows,
                  caption="neuron: per unit of activation; head: attending to its best source token")


@app.command()
def lens(args: list[str] = ARGS, k: int = typer.Option(5, "--k", min=1, help="Top tokens per cell in --json."),
         embed: bool = typer.Option(False, "--embed", help="Also read the embedding (stream entering block 0)."),
         as_json: bool = JSON_OPT, dtype: str = DTYPE_OPT, device: Optional[str] = DEVICE_OPT) -> None:
    """The logit lens: every layer's top token, its probability, entropy and KL to the output, per position."""
    from lmatlas.decode.lens import logit_lens

    def body():
        name, texts = _split(args, 1)
        model = load_model(name, dtype, device)
        result = logit_lens(model, texts[0], k=k, include_embed=embed)
        if as_json:
            return print_json(result.to_dict())
        rows, pos = result.shape
        inputs = result.input_tokens or [str(i) for i in result.input_ids.tolist()]
        fit = max(1, (out.width - 30) // POSITION_WIDTH)  # position columns that fit the terminal
        first = max(0, pos - fit)
        caption = (f"positions 0..{first - 1} not shown ({pos} in all): widen the terminal or use --json"
                   if first else None)
        table = Table(title="Logit lens: each layer's top token and its probability (green: the model's final "
                      "prediction); KL(output || layer) and entropy H in nats at the last position",
                      caption=caption, title_justify="left")
        table.add_column("layer", style="bold cyan", no_wrap=True)
        for token in inputs[first:]:
            table.add_column(Text(repr(token)), no_wrap=True, overflow="ellipsis")  # shortened with …, never cut
        table.add_column("KL", justify="right", no_wrap=True)
        table.add_column("H", justify="right", no_wrap=True)
        for r in range(rows):
            cells = []
            for j in range(first, pos):
                shown = result.top_tokens[r][j][0] if result.top_tokens else str(int(result.top_ids[r, j, 0]))
                style = "bold green" if int(result.top_ids[r, j, 0]) == int(result.final_ids[j]) else ""
                cells.append(Text(f"{shown!r}\n{float(result.top_probs[r, j, 0]):.2f}", style=style))
            cells += [f"{float(result.kl[r, -1]):.2f}", f"{float(result.entropy[r, -1]):.2f}"]
            table.add_row(result.labels[r], *cells)
        out.print(table)

    run(body)
