"""One run: check everything, harvest every site once, train a dictionary per site, save them.

    from lmatlas.features.pipeline import train_dictionaries
    run = train_dictionaries(model, ["L15.resid.post", "L10.resid.post"], TrainConfig(16384, 32), "out/")

The folder it writes::

    out/harvest/train/      activations of every site the dictionaries need (one pass for all)
    out/harvest/heldout/    the same over held-out windows (metrics as training goes, and evaluation)
    out/L15.resid.post/     a dictionary (sparsify layout: cfg.json + sae.safetensors) and its checkpoint/
    out/L15.mlp/            a skip-transcoder of MLP 15 (reads L15.mlp.in, writes L15.mlp.out)

Every check runs before any compute: sites that cannot take a dictionary, layers out of
range, ``k >= latents``, an existing harvest of something else, the disk space the
harvest needs. The same call again resumes an interrupted harvest or training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lmatlas.errors import DictionaryError
from lmatlas.features import files
from lmatlas.features.dictionary import Dictionary, check_sizes, site_width
from lmatlas.features.harvest import Activations, corpus_windows_split, harvest, needed_bytes
from lmatlas.features.train import TrainConfig, sites_for, train
from lmatlas.progress import ProgressArg

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class Run:
    """What :func:`train_dictionaries` made: dictionaries by folder, the harvests and where the windows came from."""

    out: Path
    dictionaries: dict[str, Dictionary] = field(default_factory=dict)
    train: Activations | None = None
    heldout: Activations | None = None
    corpus: dict[str, Any] = field(default_factory=dict)
    harvest_bytes: int = 0


def plan(model: "Model", sites: Sequence[str], config: TrainConfig) -> dict[str, tuple[str, str]]:
    """``{folder: (input site, output site)}`` for each requested site, every check done (no compute)."""
    check_sizes(config.n_latents, config.k)
    if not sites:
        raise DictionaryError("Name at least one site (e.g. --site L15.resid.post).")
    out: dict[str, tuple[str, str]] = {}
    for site in sites:
        pair = sites_for(str(site), config.transcoder)
        for name in pair:
            site_width(model, name)
        folder = pair[0] if not config.transcoder else pair[0].rsplit(".", 1)[0]
        out[folder] = pair
    return out


def train_dictionaries(
    model: "Model",
    sites: Sequence[str],
    config: TrainConfig,
    out: str | Path,
    *,
    tokens: int = 1_000_000,
    heldout_tokens: int = 32_768,
    seq_len: int = 128,
    corpus: str | Path | None = None,
    layout: str = "sparsify",
    progress: ProgressArg = True,
) -> Run:
    """Harvest ``tokens`` of every site once, then train and save one dictionary per site (see the module docstring)."""
    pairs = plan(model, sites, config)
    if layout not in files.LAYOUTS:
        raise DictionaryError(f"Unknown layout {layout!r}: use one of {', '.join(files.LAYOUTS)}.")
    if layout == "saelens" and config.transcoder:
        raise DictionaryError("SAELens's layout has no TopK transcoder: save transcoders with --layout sparsify.")
    out = Path(out)
    needed = sorted({name for pair in pairs.values() for name in pair})
    train_windows, held_windows, where = corpus_windows_split(
        model, tokens, heldout_tokens, seq_len, corpus, config.seed
    )
    run = Run(out, corpus=where)
    widths = [site_width(model, s) for s in needed]
    run.harvest_bytes = needed_bytes(len(train_windows) + len(held_windows), seq_len, widths)
    run.heldout = harvest(model, needed, held_windows, out / "harvest" / "heldout", progress=progress, corpus=where)
    run.train = harvest(model, needed, train_windows, out / "harvest" / "train", progress=progress, corpus=where)
    for folder, (in_site, _) in pairs.items():
        site_config = replace(config, transcoder=config.transcoder)
        result = train(run.train, in_site, site_config, heldout=run.heldout, out=out / folder, progress=progress)
        files.save(result.dictionary, out / folder, layout)
        run.dictionaries[folder] = result.dictionary
    return run


def find_dictionaries(path: str | Path) -> list[Path]:
    """The dictionary folders at ``path``: itself, or its subfolders holding a ``cfg.json``."""
    path = Path(path)
    if (path / "cfg.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/cfg.json"))
    if not found:
        raise DictionaryError(f"No dictionary at {path}: expected cfg.json there or in its subfolders.")
    return found


def find_harvest(folder: Path, split: str) -> Activations | None:
    """The harvest of ``split`` next to a dictionary folder (``../harvest/<split>`` or ``./harvest/<split>``)."""
    for base in (folder, folder.parent):
        if (base / "harvest" / split / "harvest.json").is_file():
            return Activations(base / "harvest" / split)
    return None
