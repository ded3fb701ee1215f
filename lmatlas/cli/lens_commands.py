"""Decoding commands: ``search`` (who writes a token) and ``lens`` (the logit lens).

    lmatlas search [MODEL] " dog" [--top N] [--json]   heads and neurons that promote a token, ranked
    lmatlas search [MODEL] --id 5024 [--json]          the same, by token id
    lmatlas search --atlas FILE " dog"                 the same rows, read from an atlas (no model)
    lmatlas lens [MODEL] "prompt" [--k K] [--json]     layers x positions: each layer's top token
    lmatlas lens --atlas FILE                          the lens statistics stored over the atlas corpus

Both take the model first when it is given (``lmatlas lens gemma3-270m "Hi"``); with
one argument it is the token / prompt and the packaged default model is used.

``search`` ranks every head and neuron by the logit it adds to the token through the
final norm as the model applies it (one scale for both: :mod:`lmatlas.decode.search`);
from a model it computes what an atlas stores for every token
(:mod:`lmatlas.atlas.token_search`), so both answer alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, app, load_model, out, print_json, run
from lmatlas.cli.atlas_source import ATLAS_OPT, check_atlas_use
from lmatlas.errors import LmatlasError

DEFAULT_TOP = 20  # rows of a search
POSITION_WIDTH = 11  # characters a lens position column needs (a short token and its probability)

ARGS = typer.Argument(
    ...,
    metavar="[MODEL] TEXT",
    help="An optional model (hub id, directory, .gguf, packaged name), then the token / prompt.",
    show_default=False,
)

LENS_ARGS = typer.Argument(
    None,
    metavar="[MODEL] TEXT",
    help="An optional model (hub id, directory, .gguf, packaged name), then the prompt; none with --atlas.",
    show_default=False,
)

SEARCH_ARGS = typer.Argument(
    None,
    metavar="[MODEL] TEXT",
    help="An optional model (hub id, directory, .gguf, packaged name), then the token; no model with --atlas.",
    show_default=False,
)


def _split(args: list[str], n_text: int) -> tuple[Optional[str], list[str]]:
    """``[MODEL] TEXT`` -> ``(model or None, texts)``; a clear error on a wrong count."""
    from lmatlas.errors import DecodeError

    if len(args) == n_text:
        return None, args
    if len(args) == n_text + 1:
        return args[0], args[1:]
    want = "[MODEL] TEXT" if n_text else "[MODEL] (with --id)"
    raise DecodeError(f"Expected {want}, got {len(args)} arguments: quote text that contains spaces.")


def _token_id(model, text: Optional[str], token_id: Optional[int]) -> int:
    from lmatlas.errors import DecodeError

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
        raise DecodeError(
            f"{text!r} is {len(ids)} tokens {pieces}, not one: search one token "
            f"(mind the leading space: ' dog' vs 'dog') or pass --id."
        )
    return ids[0]


@app.command()
def search(
    args: Optional[list[str]] = SEARCH_ARGS,
    token_id: Optional[int] = typer.Option(None, "--id", help="Token id instead of text."),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="Rows shown (default 20)."),
    atlas: Optional[Path] = ATLAS_OPT,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """The heads and neurons that promote a token, ranked by the logit they add through the final norm.

    Every head and neuron is scored, from the model's weights (seconds after loading), or
    read from an atlas with --atlas FILE (no model): the same rows either way.
    """

    def body():
        nonlocal args, atlas
        args = list(args or [])
        if atlas is None and args and args[0].endswith(".duckdb"):  # lmatlas search FILE TEXT
            atlas, args = Path(args[0]), args[1:]
        name, texts = _split(args, 0 if token_id is not None else 1)
        check_atlas_use(atlas, name, {})
        if token_id is not None and token_id < 0:
            raise LmatlasError(f"--id {token_id} is negative: token ids start at 0.")
        if texts and not texts[0]:
            raise LmatlasError("The token is empty: give one token (e.g. ' dog', with its leading space) or --id N.")
        if atlas is not None:
            return _search_atlas(atlas, texts[0] if texts else token_id, top, as_json)
        rows = DEFAULT_TOP if top is None else top
        from lmatlas.atlas.token_search import search_model
        from lmatlas.decode.token_text import token_text

        model = load_model(name, dtype, device)
        token = _token_id(model, texts[0] if texts else None, token_id)
        text = token_text(model.tokenizer, token)
        results = search_model(model, token, rows)
        if as_json:
            return print_json({"token": text, "id": token, "results": results})
        print_ranking(
            f"Heads and neurons promoting {text!r} (id {token}), by the logit they add", results, caption=CAPTION
        )

    run(body)


CAPTION = (
    "logit added (relative to the vocabulary's mean) through the final norm as the model applies it: a "
    "neuron where it adds most on reference text, a head attending to its best source token"
)


def print_ranking(title: str, rows: list[dict], caption: str | None = None) -> None:
    """The one table of a token search (a model's or an atlas's): rank, kind, name, logit, source, top tokens."""
    from lmatlas.cli.tables import add_columns, column_width, shown, token_list

    table = Table(title=title, caption=caption, title_justify="left")
    table.add_column("#", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column(
        "name",
        no_wrap=True,
        style="bold cyan",  # the identifying column never shrinks
        min_width=max([len("name")] + [len(row["name"]) for row in rows]),
    )
    add_columns(table, ["logit", "source"])
    with_tokens = any(row.get("top_tokens") for row in rows)
    if with_tokens:
        add_columns(table, ["top tokens"])
    width = column_width(out.width, 40, 1)
    for i, row in enumerate(rows, 1):
        cells = [
            str(i),
            row["kind"],
            row["name"],
            f"{row['logit']:.3f}",
            Text("" if row.get("source") is None else shown(row["source"])),
        ]
        if with_tokens:
            cells.append(token_list(row.get("top_tokens") or [], width))
        table.add_row(*cells)
    out.print(table)


def _search_atlas(path: Path, query: str | int, top: Optional[int], as_json: bool) -> None:
    """``lmatlas search --atlas FILE TEXT`` (or ``--id N``): :meth:`Atlas.search`, printed like a model search."""
    from lmatlas.atlas.query import Atlas

    with Atlas.open(path) as atlas:
        rows = atlas.search(query, limit=DEFAULT_TOP if top is None else top, exact=True).to_pylist()
        depth = atlas.search_depth()
    if top is not None and top > depth:
        raise LmatlasError(
            f"--top {top}: the atlas keeps the {depth} strongest heads and {depth} strongest "
            "neurons of each token; more need the model (drop --atlas)."
        )
    if as_json:
        return print_json({"atlas": str(path), "token": query, "results": rows})
    print_ranking(f"Heads and neurons promoting {query!r} in {path}, by the logit they add", rows, caption=CAPTION)


@app.command()
def lens(
    args: Optional[list[str]] = LENS_ARGS,
    k: int = typer.Option(5, "--k", min=1, help="Top tokens per cell in --json."),
    embed: bool = typer.Option(False, "--embed", help="Also read the embedding (stream entering block 0)."),
    atlas: Optional[Path] = ATLAS_OPT,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """The logit lens: every layer's top token, its probability, entropy and KL to the output, per position.

    A prompt needs the model. With --atlas FILE (and no prompt) it prints the lens statistics
    the atlas stored over its corpus: per layer, mean entropy, probability of the final
    prediction, KL to the output and top-1 agreement.
    """
    from lmatlas.decode.lens import logit_lens

    def body():
        given = list(args or [])
        if atlas is not None:
            if given:
                raise LmatlasError(
                    "The logit lens of a new prompt needs the model: drop --atlas (with --atlas and no "
                    "prompt, lmatlas lens prints the statistics the atlas stored over its corpus)."
                )
            return _lens_atlas(atlas, as_json)
        name, texts = _split(given, 1)
        if not texts[0]:
            raise LmatlasError(
                'The prompt is empty: give the text to read, e.g. `lmatlas lens "The capital of France is"`.'
            )
        model = load_model(name, dtype, device)
        result = logit_lens(model, texts[0], k=k, include_embed=embed)
        if as_json:
            return print_json(result.to_dict())
        rows, pos = result.shape
        inputs = result.input_tokens or [str(i) for i in result.input_ids.tolist()]
        fit = max(1, (out.width - 30) // POSITION_WIDTH)  # position columns that fit the terminal
        first = max(0, pos - fit)
        caption = (
            f"positions 0..{first - 1} not shown ({pos} in all): widen the terminal or use --json" if first else None
        )
        table = Table(
            title="Logit lens: each layer's top token and its probability (green: the model's final "
            "prediction); KL(output || layer) and entropy H in nats at the last position",
            caption=caption,
            title_justify="left",
        )
        label = max([len("layer")] + [len(name) for name in result.labels])
        table.add_column("layer", style="bold cyan", no_wrap=True, min_width=label)  # row labels never shrink
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


def _lens_atlas(path: Path, as_json: bool) -> None:
    """``lmatlas lens --atlas FILE``: the per-layer lens statistics the atlas stored over its corpus."""
    from lmatlas.atlas.query import Atlas
    from lmatlas.errors import AtlasError

    with Atlas.open(path) as opened:
        rows = [r for r in opened.layers().to_pylist() if r["lens_entropy"] is not None]
        if not rows:
            raise AtlasError(f"{path} has no lens statistics: add them with {opened.map_command(['lens'])}")
        corpus = opened.meta.get("corpus")
    if as_json:
        return print_json({"atlas": str(path), "corpus": corpus, "layers": rows})
    table = Table(
        title=f"Logit lens over the atlas corpus ({corpus}): per layer, means over every position", title_justify="left"
    )
    table.add_column("layer", style="bold cyan", no_wrap=True, justify="right")
    for column in ("entropy", "p(final)", "KL to output", "top-1 = output"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            f"L{r['layer']}",
            f"{r['lens_entropy']:.2f}",
            f"{r['lens_final_prob']:.3f}",
            f"{r['lens_kl_to_final']:.2f}",
            f"{r['lens_top1_agreement']:.1%}",
        )
    out.print(table)
