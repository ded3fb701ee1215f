"""Which training settings keep a TopK dictionary's latents alive: one row per variant, on a cached harvest.

    python bench/features_recipe.py --work /work/feat_full [--site L15.resid.post] [--transcoder]
        [--latents 4096] [--k 32] [--tokens 200000] --variant NAME:key=value,key=value ...
        [--out bench/results/features_recipe.json] [--note "..."]

Each ``--variant`` is a name and :class:`lmatlas.features.train.TrainConfig` fields over the
defaults (``lr=0.004,outlier_ratio=0,auxk_norm=total,batch_size=1024``). Every variant trains on
the first ``--tokens`` of the harvest's seeded order and is measured on the held-out harvest with
:func:`lmatlas.features.evaluate.reconstruction` (FVU with and without outlier positions, PCA-k
beside, dead = never active on the held-out rows) plus the training run's own dead fraction (not
fired in its last ``dead_tokens``). Rows are written as they finish, so a long sweep can be read
while it runs. Metrics do not depend on the machine's load; the seconds do (recorded with it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import Log, conditions, write_record  # noqa: E402  (bench/ is on the path)

from lmatlas.features.evaluate import PCA, reconstruction
from lmatlas.features.harvest import Activations
from lmatlas.features.train import TrainConfig, train

log = Log("bench_features_recipe")


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name:lr=0.004,outlier_ratio=0"`` -> ``("name", {"lr": 0.004, "outlier_ratio": 0.0})`` (types from TrainConfig)."""
    name, _, rest = text.partition(":")
    fields = TrainConfig.__dataclass_fields__
    changes: dict = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        default = getattr(TrainConfig(), key) if key in fields else None
        if key not in fields:
            raise SystemExit(f"{key} is not a TrainConfig field ({', '.join(fields)})")
        if value.lower() == "none":
            changes[key] = None
        elif isinstance(default, bool) or value.lower() in ("true", "false"):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) and key not in ("outlier_ratio",):
            changes[key] = int(float(value))
        elif isinstance(default, str):
            changes[key] = value
        else:
            changes[key] = float(value)
    return name, changes


def run_variant(acts, held, pca, args, name: str, changes: dict) -> dict:
    config = TrainConfig(
        **{
            "n_latents": args.latents,
            "k": args.k,
            "transcoder": args.transcoder,
            "tokens": args.tokens,
            "eval_every": 10**9,
            **changes,
        }
    )
    start = time.perf_counter()
    result = train(acts, args.site, config, progress=False)
    seconds = time.perf_counter() - start
    rec = reconstruction(result.dictionary, held, acts, pca=pca)
    training = result.dictionary.card.training
    row = {
        "variant": name,
        "changes": changes,
        "steps": result.steps,
        "tokens": result.tokens,
        "lr": training["lr"],
        "dead_tokens": training["dead_tokens"],
        "dead_heldout": round(rec["dead_fraction"], 5),
        "dead_train": round(training["dead_fraction_train"], 5),
        "fvu": round(rec["fvu"]["dictionary"], 5),
        "fvu_pca": round(rec["fvu"]["pca"], 5),
        "fvu_without_outliers": round(rec["fvu_without_sinks"]["dictionary"], 5),
        "fvu_pca_without_outliers": round(rec["fvu_without_sinks"]["pca"], 5),
        "outlier_positions_heldout": rec["fvu_without_sinks"]["positions_left_out"],
        "dense_fraction": round(rec["dense_fraction"], 5),
        "l0": round(rec["l0"]["dictionary"], 2),
        "train_seconds_under_load": round(seconds, 1),
    }
    if "skip_only" in rec["fvu"]:
        row["fvu_skip_only"] = round(rec["fvu"]["skip_only"], 5)
    log(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/work/feat_full"))
    parser.add_argument("--site", default="L15.resid.post")
    parser.add_argument("--transcoder", action="store_true")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--out", default="bench/results/features_recipe.json")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.transcoder and args.site.endswith("resid.post"):
        args.site = args.site.replace("resid.post", "mlp.in")
    before = conditions()
    acts = Activations(args.work / "harvest" / "train")
    held = Activations(args.work / "harvest" / "heldout")
    out_site = args.site.replace("mlp.in", "mlp.out") if args.transcoder else args.site
    pca = PCA(acts.rows(out_site, 65536), args.k)
    record = {
        "benchmark": "features_recipe",
        "note": args.note,
        "harvest": str(args.work / "harvest"),
        "site": args.site,
        "transcoder": args.transcoder,
        "latents": args.latents,
        "k": args.k,
        "tokens": args.tokens,
        "heldout_tokens": held.n_tokens,
        "rows": [],
    }
    for text in args.variant:
        name, changes = parse_variant(text)
        record["rows"].append(run_variant(acts, held, pca, args, name, changes))
        write_record(args.out, record, before)


if __name__ == "__main__":
    main()
