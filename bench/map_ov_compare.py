"""Benchmark: head OV decoding of this checkout against an earlier commit's, same heads, same run.

Exports ``lmatlas/decode/heads.py`` of ``--baseline`` (``git show``) as a standalone module,
decodes the same heads with it and with this checkout (the atlas's ``ov`` stage settings:
256 seeded sources, k = 10, 10 pairs), alternating per head so that both see the same load,
and reports the time of each and every head whose decoded tokens differ (top and bottom
ids, pairs, copying and suppression), with whether the difference is a tie in value.

    .venv/bin/python bench/map_ov_compare.py --baseline COMMIT [--layers 0,3,6] [--record FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import ROOT, conditions, emit, load_model  # noqa: E402  (bench/ is on the path)

from lmatlas.decode import heads as current

SETTINGS = {"sources": 256, "k": 10, "n_pairs": 10}


def old_heads(commit: str):
    """The module ``lmatlas/decode/heads.py`` as it was at ``commit``."""
    text = subprocess.run(
        ["git", "show", f"{commit}:lmatlas/decode/heads.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="lmatlas-ov-")) / "heads_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("heads_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["heads_baseline"] = module
    spec.loader.exec_module(module)
    return module


def difference(a, b) -> dict | None:
    """``None`` when the decodings agree; else where they differ and whether only tied logits swapped."""
    rows = lambda x, y: (x != y).any(1).nonzero().flatten().tolist()  # noqa: E731
    top, bottom = rows(a.top.ids, b.top.ids), rows(a.bottom.ids, b.bottom.ids)
    same_scores = a.copying == b.copying and a.suppression == b.suppression and a.pairs == b.pairs
    if not top and not bottom and same_scores:
        return None
    sets = all(
        set(x[i].tolist()) == set(y[i].tolist())
        for x, y, bad in ((a.top.ids, b.top.ids, top), (a.bottom.ids, b.bottom.ids, bottom))
        for i in bad
    )
    values = torch.equal(a.top.logits, b.top.logits) and torch.equal(a.bottom.logits, b.bottom.logits)
    return {"top_rows": top, "bottom_rows": bottom, "scores_same": same_scores, "tie_order_only": sets and values}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    model, old = load_model(args.model), old_heads(args.baseline)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(model.layout.n_layers))
    seconds, changes = {"baseline": 0.0, "current": 0.0}, {}
    for layer in layers:
        for head in range(model.layout.n_heads):
            decoded = {}
            for name, module in (("baseline", old), ("current", current)):
                start = time.perf_counter()
                decoded[name] = module.decode_ov(model, layer, head, seed=0, **SETTINGS)
                seconds[name] += time.perf_counter() - start
            found = difference(decoded["baseline"], decoded["current"])
            if found:
                changes[f"L{layer}.H{head}"] = found
    result = {
        "benchmark": "map_ov_compare",
        "model": args.model,
        "baseline": args.baseline,
        "torch_threads": torch.get_num_threads(),
        "layers": layers,
        "heads": len(layers) * model.layout.n_heads,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "speedup": round(seconds["baseline"] / seconds["current"], 2),
        "heads_differing": len(changes),
        "only_tie_order": all(c["tie_order_only"] and c["scores_same"] for c in changes.values()),
        "changes": changes,
    }
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
