"""Sparse dictionary commands: ``lmatlas features train`` and ``lmatlas features eval``.

    lmatlas features train [MODEL] --site L15.resid.post [--site L10.resid.post] --latents 16384 --k 32
                           [--tokens 1000000] [--epochs 1] [--out DIR] [--transcoder] [--seed 0]
                           [--corpus PATH] [--layout sparsify|saelens] [--json]
    lmatlas features eval [MODEL] DIR [--windows 32] [--json]

``train`` harvests every site once (one forward pass for all of them), then trains one TopK
SAE per site (``--transcoder``: a skip-transcoder of that layer's MLP), with progress, ETA and
held-out metrics as it goes; the same command again resumes an interrupted run. ``eval``
reports SAEBench's core metrics for the dictionaries in DIR (one, or a run's folder), each
beside a PCA baseline with k components.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, MODEL_ARG, app, load_model, out, print_json, run

if TYPE_CHECKING:
    from lmatlas.features.pipeline import Run
    from lmatlas.features.train import TrainConfig

features_app = typer.Typer(
    no_args_is_help=True, help="Sparse dictionaries: train TopK SAEs and transcoders, evaluate them."
)
app.add_typer(features_app, name="features")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@features_app.command("train")
def train_command(
    model: Optional[str] = MODEL_ARG,
    site: list[str] = typer.Option(
        ..., "--site", help="Site to train on (repeat for several; one harvest pass serves all)."
    ),
    latents: int = typer.Option(16384, "--latents", help="Latents (dictionary width)."),
    k: int = typer.Option(32, "--k", help="Latents kept per token (TopK)."),
    tokens: int = typer.Option(1_000_000, "--tokens", help="Training tokens to harvest."),
    heldout_tokens: int = typer.Option(32_768, "--heldout-tokens", help="Held-out tokens (metrics, never trained on)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the harvest."),
    batch: int = typer.Option(4096, "--batch", help="Tokens per step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam's learning rate (default: scaled by width)."),
    out_dir: Path = typer.Option(
        Path("lmatlas-features"), "--out", help="Folder for the harvest and the dictionaries."
    ),
    transcoder: bool = typer.Option(
        False, "--transcoder", help="Skip-transcoders of the sites' MLPs (L15.mlp.in -> L15.mlp.out)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the data order."),
    corpus: Optional[str] = typer.Option(
        None,
        "--corpus",
        help="A built corpus folder (lmatlas corpus build writes ~/.cache/lmatlas/corpus/english) or a text file "
        "(default: the small built-in corpus, as for the atlas).",
    ),
    layout: str = typer.Option("sparsify", "--layout", help="File layout: sparsify or saelens (SAEs only)."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Train TopK SAEs (or skip-transcoders) on sites of a model, with held-out metrics as it goes."""
    from lmatlas.features.pipeline import plan, train_dictionaries

    def body():
        config = _train_config(site, latents, k, transcoder, tokens, epochs, batch, lr, seed)
        loaded = load_model(model, dtype, device)
        plan(loaded, site, config)
        result = train_dictionaries(
            loaded, site, config, out_dir, tokens=tokens, heldout_tokens=heldout_tokens, corpus=corpus, layout=layout
        )
        info = _train_info(result, out_dir)
        if as_json:
            print_json(info)
            return
        _print_train(info, out_dir)

    run(body)


def _train_config(
    site: list[str],
    latents: int,
    k: int,
    transcoder: bool,
    tokens: int,
    epochs: float,
    batch: int,
    lr: float | None,
    seed: int,
) -> "TrainConfig":
    """Check the options that need no model (sizes, site names), then the training settings they give."""
    from lmatlas.features.dictionary import check_sizes, split_site
    from lmatlas.features.train import TrainConfig

    check_sizes(latents, k)  # the cheap checks come before loading the model
    for name in site:
        split_site(name)
    return TrainConfig(
        n_latents=latents,
        k=k,
        transcoder=transcoder,
        tokens=None if epochs == 1 else int(epochs * tokens),
        batch_size=batch,
        lr=lr,
        seed=seed,
    )


def _train_info(result: "Run", out_dir: Path) -> dict:
    """``{"dictionaries": [one row per dictionary, its last held-out metrics], "harvest": {...}}`` (the JSON output)."""
    rows = []
    for folder, d in result.dictionaries.items():
        last = (d.card.training.get("history") or [{}])[-1]
        rows.append(
            {
                "folder": str(out_dir / folder),
                "site": d.card.site,
                "out_site": d.card.out_site,
                "kind": d.card.kind,
                "latents": d.card.n_latents,
                "k": d.card.k,
                "heldout_fvu": last.get("heldout_fvu"),
                "l0": last.get("l0"),
                "dead_fraction": last.get("dead_fraction"),
                "steps": d.card.training["steps"],
                "seconds": d.card.training["seconds"],
            }
        )
    return {
        "dictionaries": rows,
        "harvest": {
            "train_tokens": result.train.n_tokens,
            "heldout_tokens": result.heldout.n_tokens,
            "bytes": result.train.file_bytes() + result.heldout.file_bytes(),
            "corpus": result.corpus,
        },
    }


def _print_train(info: dict, out_dir: Path) -> None:
    """The harvest's line, a table of the dictionaries and the command that evaluates them."""
    h = info["harvest"]
    out.print(
        f"Harvest: {h['train_tokens']:,} training and {h['heldout_tokens']:,} held-out tokens, "
        f"{h['bytes'] / 2**20:,.1f} MiB on disk ({h['corpus'].get('corpus')})"
    )
    if "short" in h["corpus"]:
        out.print(f"[yellow]Note: {h['corpus']['short']}.[/yellow]")
    table = Table(title="Dictionaries", title_justify="left")
    for column in ("folder", "kind", "latents", "k", "held-out FVU", "L0", "dead", "steps", "seconds"):
        table.add_column(column, justify="left" if column in ("folder", "kind") else "right")
    for r in info["dictionaries"]:
        fvu = "-" if r["heldout_fvu"] is None else f"{r['heldout_fvu']:.3f}"
        l0 = "-" if r["l0"] is None else f"{r['l0']:.1f}"
        table.add_row(
            r["folder"],
            r["kind"],
            f"{r['latents']:,}",
            str(r["k"]),
            fvu,
            l0,
            _pct(r["dead_fraction"] or 0),
            str(r["steps"]),
            f"{r['seconds']:.0f}",
        )
    out.print(table)
    out.print("Evaluate with: lmatlas features eval MODEL " + str(out_dir))


@features_app.command("eval")
def eval_command(
    model: Optional[str] = MODEL_ARG,
    path: Path = typer.Argument(..., help="A dictionary folder, or a run's folder holding several."),
    windows: int = typer.Option(32, "--windows", help="Held-out windows run with the dictionary spliced in."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """SAEBench core metrics (FVU, L0, spliced CE/KL, loss recovered, dead/dense) beside a PCA-k baseline."""
    from lmatlas.features import files
    from lmatlas.features.evaluate import evaluate
    from lmatlas.features.harvest import corpus_windows_split, harvest
    from lmatlas.features.pipeline import find_dictionaries, find_harvest

    def body():
        folders = find_dictionaries(path)
        loaded = load_model(model, dtype, device)
        reports = []
        for folder in folders:
            d = files.load(folder, loaded)
            sites = sorted({d.card.site, d.card.out_site})
            held, train = find_harvest(folder, "heldout"), find_harvest(folder, "train")
            if held is None or any(s not in held.sites for s in sites):
                train_w, held_w, where = corpus_windows_split(loaded, 65_536, 32_768, 128)
                base = folder / "harvest-eval"
                held = harvest(loaded, sites, held_w, base / "heldout", corpus=where)
                train = harvest(loaded, sites, train_w, base / "train", corpus=where)
            if train is not None and any(s not in train.sites for s in sites):
                train = None
            reports.append({"folder": str(folder), **evaluate(loaded, d, held, train, windows=windows)})
        if as_json:
            print_json(reports)
            return
        for r in reports:
            table = Table(
                title=f"{r['folder']}: {r['kind']} {r['site']} ({r['n_latents']:,} latents, k={r['k']})",
                title_justify="left",
            )
            table.add_column("metric")
            table.add_column("dictionary", justify="right")
            table.add_column(f"PCA-{r['k']}", justify="right")
            table.add_row("FVU (held-out, BOS excluded)", f"{r['fvu']['dictionary']:.4f}", f"{r['fvu']['pca']:.4f}")
            table.add_row(
                "FVU (BOS included)", f"{r['fvu_with_bos']['dictionary']:.4f}", f"{r['fvu_with_bos']['pca']:.4f}"
            )
            table.add_row("L0", f"{r['l0']['dictionary']:.1f}", str(r["l0"]["pca"]))
            table.add_row(
                "CE increase (nats)", f"{r['ce_increase']['dictionary']:+.4f}", f"{r['ce_increase']['pca']:+.4f}"
            )
            table.add_row("KL (nats)", f"{r['kl']['dictionary']:.4f}", f"{r['kl']['pca']:.4f}")
            table.add_row("loss recovered", _pct(r["loss_recovered"]["dictionary"]), _pct(r["loss_recovered"]["pca"]))
            if "skip_only" in r["fvu"]:
                table.add_row("FVU of the skip alone", f"{r['fvu']['skip_only']:.4f}", "")
            out.print(table)
            out.print(
                f"clean CE {r['ce']['clean']:.4f}, mean ablation {r['ce']['mean_ablation']:.4f} "
                f"(+{r['ce_increase']['mean_ablation']:.4f}); dead {_pct(r['dead_fraction'])}, "
                f"dense (> {r['dense_threshold']:.0%} of tokens) {_pct(r['dense_fraction'])}; "
                f"{r['tokens']:,} held-out tokens, {r['windows']} windows spliced"
            )

    run(body)
