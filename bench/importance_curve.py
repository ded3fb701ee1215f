"""The ``importance`` stage's ranks against its cost settings: how cheap can it be and rank as the default does?

    python bench/importance_curve.py [--model smollm2-135m] [--sequences 1 2] [--verify 0 4 8 16] [--exact]
                                     [--record bench/results/importance_curve.json]

For every pair of ``importance_sequences`` (corpus windows scored) and ``importance_verify``
(heads re-measured by a real ablation; every MLP always is) the stage's 30 units run on the
default build context at one thread; the record keeps each setting's seconds (under whatever
load the machine had: see the conditions), its work (layer-tokens, load-independent) and the
Spearman correlation of its ``delta_loss`` with the default setting's (2 windows, 8 verified),
over the heads, the MLPs and all components together. ``--exact`` adds the exact mean ablation
of every component (``importance_method="mean-ablation"``) on the default windows, and each
setting's Spearman against it (how well the estimate ranks, as opposed to how well a setting
reproduces the default build).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import conditions, emit, load_model  # noqa: E402

DEFAULT = (2, 8)


def run(model, sequences: int, verify: int, method: str = "attribution") -> dict:
    """``delta_loss`` of every head and MLP (layer-major), seconds and layer-tokens of one setting."""
    from lmatlas.atlas.pipeline import make_context
    from lmatlas.atlas.stages import all_stages

    stage = all_stages()["importance"]
    params = {"importance_sequences": sequences, "importance_verify": verify, "importance_method": method}
    ctx = make_context(model, params=params)
    heads, mlps = [], []
    before, start = model.work.snapshot(), time.perf_counter()
    for unit in stage.plan(model, ctx):
        rows = stage.compute(model, unit, ctx)
        heads += [r["delta_loss"] for r in rows["head_importance"]]
        mlps += [r["delta_loss"] for r in rows["mlp_importance"]]
    seconds = time.perf_counter() - start
    work = model.work.snapshot() - before
    return {"heads": heads, "mlps": mlps, "seconds": round(seconds, 2), "layer_tokens": work.layer_tokens}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    import torch

    def ranks(values: list[float]) -> torch.Tensor:
        x = torch.tensor(values, dtype=torch.float64)
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        for value in x.unique():  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return round(float((ra @ rb) / (ra.norm() * rb.norm())), 4)


def agreement(found: dict, reference: dict) -> dict:
    return {
        "heads": spearman(found["heads"], reference["heads"]),
        "mlps": spearman(found["mlps"], reference["mlps"]),
        "all": spearman(found["heads"] + found["mlps"], reference["heads"] + reference["mlps"]),
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--verify", type=int, nargs="+", default=[0, 4, 8, 16])
    parser.add_argument("--exact", action="store_true", help="also every component's exact mean ablation")
    parser.add_argument("--record", default=None)
    args = parser.parse_args()
    before = conditions()
    torch.set_num_threads(1)
    model = load_model(args.model)
    settings = sorted({(s, v) for s in args.sequences for v in args.verify} | {DEFAULT})
    found = {setting: run(model, *setting) for setting in settings}
    reference = found[DEFAULT]
    exact = run(model, DEFAULT[0], 0, method="mean-ablation") if args.exact else None
    rows = []
    for (sequences, verify), result in found.items():
        row = {"importance_sequences": sequences, "importance_verify": verify, "seconds": result["seconds"]}
        row["layer_tokens"] = result["layer_tokens"]
        row["spearman_vs_default"] = agreement(result, reference)
        if exact is not None:
            row["spearman_vs_exact"] = agreement(result, exact)
        rows.append(row)
    result = {"benchmark": "importance_curve", "model": args.model, "torch_threads": 1, "default": list(DEFAULT)}
    result["settings"] = rows
    if exact is not None:
        result["exact"] = {"seconds": exact["seconds"], "layer_tokens": exact["layer_tokens"]}
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
