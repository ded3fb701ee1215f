"""Harvest: a site's activations over corpus windows, written once to memory-mapped fp16 shards.

Training reads the same activations for every epoch, so they are computed once (a forward
that stops after the last block needed, ``Model.run(..., stop_after=L)``), several sites in one
pass, and written as ``.npy`` files (fp16, readable with ``numpy.load(mmap_mode="r")``)::

    DIR/harvest.json                 sites and widths, windows, shards done, the model's identity
    DIR/tokens.npy                   int32 [windows, seq_len]: the token windows
    DIR/L15.resid.post/00000.npy     fp16 [shard_windows * (seq_len - 1), d]: positions 1.. of each window
    DIR/L15.resid.post/00000.bos.npy fp16 [shard_windows, d]: position 0 of each window, kept apart

Position 0 of a window is the model's attention sink (BOS or not: its residual norm is tens of
times the others'), so it is kept apart: training and the headline FVU leave it out, evaluation
reports the FVU with it too.

Before writing, the free disk space is checked against what the harvest needs; every batch
is checked for NaN/inf (the error names the site, window and position). A shard is written
to a temporary name and renamed when complete, and ``harvest.json`` records the shards done,
so an interrupted harvest resumes where it stopped (the same call again).

``mlp.in`` (an MLP's normalised input, the input of a transcoder) is read by a forward
pre-hook on the family's ``mlp`` module when the site grammar has no such component.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from lmatlas.errors import DictionaryError
from lmatlas.features.dictionary import site_width, split_site
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

FORMAT = 1
_MARGIN = 256 << 20  # keep this much disk free beyond the harvest itself


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def needed_bytes(n_windows: int, seq_len: int, widths: Sequence[int]) -> int:
    """Disk bytes of a harvest: fp16 activations of every position at every site, plus the tokens."""
    return n_windows * seq_len * (2 * sum(widths) + 4)


def check_disk(path: Path, needed: int) -> None:
    """Refuse a harvest that would not fit (saying how much it needs and how much is free)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + _MARGIN > free:
        raise DictionaryError(
            f"The harvest needs {_mib(needed)} at {path} (plus {_mib(_MARGIN)} spare) but only {_mib(free)} is free: "
            "free some space, pass another --out, or harvest fewer tokens (--tokens)."
        )


@contextmanager
def mlp_inputs(model: "Model", layers: Sequence[int], stash: dict[int, torch.Tensor]) -> Iterator[None]:
    """Store each listed layer's MLP input (the normalised ``resid.mid``) in ``stash[layer]`` during forwards."""
    handles = []

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            stash[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    try:
        for layer in layers:
            handles.append(model.module("mlp", layer).register_forward_pre_hook(hook_for(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _native_mlp_in(model: "Model") -> bool:
    from lmatlas.model.sites import COMPONENTS

    return "mlp.in" in COMPONENTS


def capture(model: "Model", ids: torch.Tensor, sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{site: [batch, pos, d]}`` for token ids ``[batch, pos]``, one forward stopping after the last layer needed."""
    parsed = {site: split_site(site) for site in sites}
    hooked = [] if _native_mlp_in(model) else [s for s, (_, c) in parsed.items() if c == "mlp.in"]
    native = [s for s in sites if s not in hooked]
    stop = max(layer for layer, _ in parsed.values())
    stash: dict[int, torch.Tensor] = {}
    with mlp_inputs(model, [parsed[s][0] for s in hooked], stash):
        cache = model.run(ids, capture=native, stop_after=stop, lm_head=False)
    out = {site: cache[site] for site in native}
    out.update({site: stash[parsed[site][0]] for site in hooked})
    return {site: out[site] for site in sites}


def check_finite(value: torch.Tensor, site: str, first_window: int) -> None:
    """Refuse NaN/inf activations, naming the site (its layer), the window and the position."""
    bad = ~torch.isfinite(value)
    if bad.any():
        window, position = (int(i) for i in bad.any(-1).nonzero()[0])
        layer = split_site(site)[0]
        raise DictionaryError(
            f"Non-finite activations (NaN or inf) at {site} (layer {layer}), window {first_window + window}, "
            f"position {position}: the model overflows there (load it in float32, or leave that text out)."
        )


def corpus_windows_split(
    model: "Model",
    train_tokens: int,
    heldout_tokens: int,
    seq_len: int = 128,
    corpus: str | Path | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(train [n, seq_len], heldout [m, seq_len], where)``: token windows for a harvest.

    ``corpus`` is a built corpus folder (``lmatlas corpus build`` writes
    :func:`lmatlas.corpus.default_corpus_dir`; its held-out split is documents training never
    sees) or a text file; ``None`` takes the small default corpus, as the atlas and the census do
    (its last windows are held out), whatever happens to be built on this machine.
    """
    import lmatlas.corpus as corpora

    n_train, n_held = -(-train_tokens // (seq_len - 1)), max(1, -(-heldout_tokens // (seq_len - 1)))
    folder = Path(corpus) if corpus is not None else None
    if folder is not None and folder.is_dir():
        built = corpora.open_corpus(folder)
        train = built.windows(model, n_train, seq_len, seed=seed)
        held = built.windows(model, n_held, seq_len, seed=seed, split="heldout")
        where = {"corpus": str(folder), "digest": built.digest, "split": "train / heldout documents", "seed": seed}
    else:
        texts = corpora.load_texts(folder)
        windows = corpora.corpus_windows(model, texts, n_train + n_held, seq_len)
        if len(windows) < 2:
            raise DictionaryError("The corpus holds fewer than two windows: pass a larger corpus.")
        n_held = min(n_held, max(1, len(windows) // 10))
        train, held = windows[:-n_held], windows[-n_held:]
        where = {
            "corpus": str(folder) if folder else "default (stdlib docstrings)",
            "split": f"last {n_held} windows held out",
        }
    if len(train) < n_train:
        where["short"] = f"the corpus holds {len(train) * (seq_len - 1):,} training tokens, not {train_tokens:,}"
    return train, held, where


def _windows_hash(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _harvest_shard(
    model: "Model", sites: list[str], windows: torch.Tensor, lo: int, batch_size: int, out: Path, shard: int, task: Any
) -> None:
    """Capture ``sites`` over one shard's ``windows [w, seq_len]`` (the first at index ``lo``) and write its files.

    Per site: ``out/site/{shard}.bos.npy`` (position 0, ``[w, d]``) and ``out/site/{shard}.npy``
    (the other positions, ``[w * (seq_len - 1), d]``), float16.
    """
    hi = lo + len(windows)
    parts: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    for start in range(lo, hi, batch_size):
        ids = windows[start - lo : min(hi, start + batch_size) - lo]
        with torch.no_grad():
            values = capture(model, ids, sites)
        for site, value in values.items():
            check_finite(value, site, start)
            parts[site].append(value.to(torch.float16).cpu())
        task.update(min(hi, start + batch_size))
    for site in sites:
        block = torch.cat(parts[site])  # [w, seq_len, d]
        _save_npy(out / site / f"{shard:05d}.bos.npy", block[:, 0].numpy())
        _save_npy(out / site / f"{shard:05d}.npy", block[:, 1:].reshape(-1, block.shape[-1]).numpy())


def harvest(
    model: "Model",
    sites: Sequence[str],
    windows: torch.Tensor,
    out: str | Path,
    *,
    batch_size: int = 8,
    shard_windows: int = 64,
    progress: ProgressArg = True,
    corpus: dict[str, Any] | None = None,
) -> "Activations":
    """Write the activations of ``sites`` over ``windows [n, seq_len]`` to ``out`` (resumes a partial harvest).

    Returns the :class:`Activations` reader. ``corpus`` (optional) is recorded as where the
    windows came from.
    """
    from lmatlas.model.provenance import identity

    out = Path(out)
    sites = list(dict.fromkeys(str(s) for s in sites))
    widths = {site: site_width(model, site) for site in sites}
    n, seq_len = (int(s) for s in windows.shape)
    if seq_len < 2:
        raise DictionaryError("Harvest windows need at least 2 tokens (position 0 is kept apart).")
    n_shards = -(-n // shard_windows)
    meta = {
        "format": FORMAT,
        "sites": widths,
        "windows": n,
        "seq_len": seq_len,
        "shard_windows": shard_windows,
        "shards": n_shards,
        "tokens": n * (seq_len - 1),
        "bos_tokens": n,
        "windows_sha256": _windows_hash(windows),
        "dtype": "float16",
        "model": identity(model),
        "corpus": corpus or {},
        "shards_done": 0,
    }
    info_path = out / "harvest.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        same = all(
            old.get(key) == meta[key] for key in ("sites", "windows", "seq_len", "shard_windows", "windows_sha256")
        )
        if not same or old.get("model", {}).get("weights") != meta["model"]["weights"]:
            raise DictionaryError(
                f"{out} holds another harvest (other sites, windows or model): pass another --out or delete it."
            )
        meta["shards_done"] = int(old.get("shards_done", 0))
    done = meta["shards_done"]
    left = n - min(n, done * shard_windows)
    if left:
        check_disk(out, needed_bytes(left, seq_len, list(widths.values())))
    out.mkdir(parents=True, exist_ok=True)
    for site in sites:
        (out / site).mkdir(exist_ok=True)
    if not (out / "tokens.npy").is_file():
        _save_npy(out / "tokens.npy", windows.to(torch.int32).numpy())
    info_path.write_text(json.dumps(meta, indent=1))
    with progress_task(f"Harvesting {', '.join(sites)}", total=n, enabled=progress) as task:
        task.update(done * shard_windows)
        for shard in range(done, n_shards):
            lo, hi = shard * shard_windows, min(n, (shard + 1) * shard_windows)
            _harvest_shard(model, sites, windows[lo:hi], lo, batch_size, out, shard, task)
            meta["shards_done"] = shard + 1
            info_path.write_text(json.dumps(meta, indent=1))
    return Activations(out)


@dataclass
class Activations:
    """A harvest on disk: read shards (memory-mapped), batches for training, samples and BOS rows.

    ``Activations(path).batches(["L15.resid.post"], 4096, seed=0, epoch=0)`` yields tuples of
    float32 ``[batch, d]`` tensors, one per site, the rows aligned across sites (the same tokens).
    """

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)
        info = self.path / "harvest.json"
        if not info.is_file():
            raise DictionaryError(f"No harvest at {self.path} (no harvest.json): run the harvest first.")
        self.meta = json.loads(info.read_text())
        if self.meta["shards_done"] < self.meta["shards"]:
            raise DictionaryError(
                f"The harvest at {self.path} is incomplete ({self.meta['shards_done']}/{self.meta['shards']} shards): "
                "run it again to resume."
            )

    @property
    def sites(self) -> dict[str, int]:
        return dict(self.meta["sites"])

    @property
    def n_tokens(self) -> int:
        """Rows without position 0 (what training reads)."""
        return int(self.meta["tokens"])

    @property
    def n_shards(self) -> int:
        return int(self.meta["shards"])

    def shard(self, site: str, index: int, bos: bool = False) -> np.ndarray:
        """One shard of ``site``, memory-mapped fp16 ``[rows, d]``."""
        self._check_site(site)
        return np.load(self.path / site / f"{index:05d}{'.bos' if bos else ''}.npy", mmap_mode="r")

    def bos(self, site: str) -> torch.Tensor:
        """Position 0 of every window: float32 ``[windows, d]``."""
        return torch.from_numpy(np.concatenate([self.shard(site, i, bos=True) for i in range(self.n_shards)])).float()

    def rows(self, site: str, limit: int | None = None) -> torch.Tensor:
        """The first ``limit`` non-BOS rows (all by default), float32 ``[rows, d]``."""
        parts, total = [], 0
        for i in range(self.n_shards):
            part = self.shard(site, i)
            if limit is not None:
                part = part[: limit - total]
            parts.append(np.asarray(part))
            total += len(parts[-1])
            if limit is not None and total >= limit:
                break
        return torch.from_numpy(np.concatenate(parts)).float()

    def tokens(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.path / "tokens.npy")).long()

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*.npy"))

    def batches(
        self, sites: Sequence[str], batch_size: int, *, seed: int, epoch: int, mix: int = 8
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Shuffled float32 batches ``(x_site1 [B, d1], ...)``: shards in a seeded order, rows shuffled
        across ``mix`` shards at a time; the order depends only on ``(seed, epoch)``. The last partial
        batch of an epoch is dropped."""
        for site in sites:
            self._check_site(site)
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(self.n_shards)
        carry: list[np.ndarray] | None = None
        for start in range(0, len(order), mix):
            group = order[start : start + mix]
            blocks = [np.concatenate([np.asarray(self.shard(site, int(i))) for i in group]) for site in sites]
            if carry is not None:
                blocks = [np.concatenate([c, b]) for c, b in zip(carry, blocks)]
            perm = rng.permutation(len(blocks[0]))
            blocks = [b[perm] for b in blocks]
            full = len(perm) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                yield tuple(torch.from_numpy(b[lo : lo + batch_size]).float() for b in blocks)
            carry = [b[full:] for b in blocks]

    def _check_site(self, site: str) -> None:
        if site not in self.meta["sites"]:
            raise DictionaryError(
                f"The harvest at {self.path} has no {site} (it has {', '.join(self.meta['sites'])}): harvest that site."
            )
