"""Dead latents of finished dictionaries, counted over a larger held-out harvest; the harvest's own rate.

``bench/features.py`` counts a latent dead when it never fires on its 32,768 held-out tokens:
at 16,384 latents and k = 32 a latent fires on average once per 512 tokens, so one that fires
once per 40,000 tokens looks dead there although it is alive. This script

1. harvests ``--heldout-tokens`` tokens (default 327,680) of the corpus's held-out documents at
   the L{layer} sites the dictionaries read and write (timed: tokens per second, with the
   machine's load, so a quiet run judges the 1M-token harvest target by its rate);
2. loads the finished SAE and transcoder from ``--work`` (the folder ``bench/features.py`` trained
   them in; its cached training harvest is read back, not rewritten) and reports, per dictionary,
   the share of latents never active over the first 32,768 held-out tokens and over all of them,
   with the reconstruction metrics of :func:`lmatlas.features.evaluate.reconstruction` on all of them.

    .venv/bin/python bench/features_dead.py --work /work/feat_full [--heldout-tokens 327680] \\
        [--record bench/results/features_dead.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from features import train_config  # noqa: E402  (bench/ is on the path)
from harness import Log, conditions, emit, load_model  # noqa: E402

from lmatlas.features.evaluate import reconstruction
from lmatlas.features.harvest import corpus_windows_split, harvest
from lmatlas.features.train import train

log = Log("features_dead")


def never_active(d, rows: torch.Tensor, chunk: int = 8192) -> float:
    """Share of ``d``'s latents that select no row of ``rows [n, d_in]`` (TopK codes, plain loop)."""
    fired = torch.zeros(d.card.n_latents, dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, len(rows), chunk):
            codes = d.encode(rows[start : start + chunk].float())
            fired |= (codes > 0).any(0)
    return float((~fired).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument(
        "--work", type=Path, required=True, help="the --work folder of a finished bench/features.py run"
    )
    parser.add_argument("--tokens", type=int, default=1_000_000, help="the training tokens of that run")
    parser.add_argument("--heldout-tokens", type=int, default=327_680)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", default=None)
    args = parser.parse_args()
    before = conditions()
    model = load_model(args.model)
    from lmatlas.corpus import default_corpus_dir

    corpus = str(default_corpus_dir())
    train_w, held_w, where = corpus_windows_split(model, args.tokens, args.heldout_tokens, 128, corpus, args.seed)
    L = args.layer
    sites = [f"L{L}.resid.post", f"L{L}.mlp.in", f"L{L}.mlp.out"]
    out = args.work / f"heldout_{args.heldout_tokens}"
    start = time.perf_counter()
    held = harvest(model, sites, held_w, out, corpus=where)
    seconds = time.perf_counter() - start
    tokens = held.n_tokens + held.meta["bos_tokens"]
    log(f"harvest: {tokens:,} held-out tokens in {seconds:.1f}s")
    acts = harvest(model, sites, train_w, args.work / "harvest" / "train", corpus=where, progress=False)
    result = {
        "benchmark": "features_dead",
        "model": model.provenance.source,
        "corpus": where,
        "harvest": {
            "sites": sites,
            "tokens": tokens,
            "seconds": round(seconds, 1),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "minutes_per_1m_tokens": round(seconds / tokens * 1e6 / 60, 1),
        },
        "dictionaries": {},
    }
    for kind, site in (("sae", f"L{L}.resid.post"), ("transcoder", f"L{L}.mlp.in")):
        if not (args.work / kind).is_dir():
            continue
        trained = train(acts, site, train_config(kind, acts, args), heldout=held, out=args.work / kind, progress=False)
        d = trained.dictionary
        if not d.card.training.get("finished"):
            raise SystemExit(f"{kind}: the checkpoint in {args.work / kind} is not finished")
        rows = held.rows(site, held.n_tokens)
        result["dictionaries"][kind] = {
            "site": site,
            "latents": d.card.n_latents,
            "never_active_first_32768": never_active(d, rows[:32768]),
            "never_active_all": never_active(d, rows),
            "heldout_tokens": len(rows),
            "reconstruction": reconstruction(d, held, acts, rows=held.n_tokens),
        }
        log(
            f"{kind}: never active {result['dictionaries'][kind]['never_active_all']:.3%} of latents over {len(rows):,}"
        )
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
