"""Benchmark: the ``neurons`` stage's rows and their write, this checkout's against an older commit's, interleaved.

Both sides build one layer's rows from the same decoding and write them into their own atlas
file, alternating layer by layer (old, new, new, old, ...: both see the same load). The
decoding is random, of the model's shape (``n_layers * d_mlp`` neurons, ``top_k`` tokens per
ranking: the values do not change the cost), so no neuron is decoded. The two files' ``neurons``
tables are then compared row for row (``rows_only_in_old`` / ``rows_only_in_new``: 0 and 0 when
identical).

    .venv/bin/python bench/map_rows.py --old COMMIT [--model smollm2-135m] [--record FILE]
                                       [--decode-layers N --rounds R]

``--decode-layers N`` also times the decoding the stage asks for on the first ``N`` layers, the old
way (``decode_neurons`` with every input side: gate and in) against the new (the one side the stage
stores: gate for gated MLPs), alternated ``R`` times each, and checks that every ranking the
stage stores is identical (``decode``).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from harness import ROOT, conditions, emit, load_model  # noqa: E402  (bench/ is on the path)

from lmatlas.atlas.stages import BuildContext
from lmatlas.atlas.stages import neurons as new_stage
from lmatlas.atlas.store import AtlasStore
from lmatlas.decode.neurons import NeuronDecoding
from lmatlas.decode.topk import TokenRanking


def old_stage(commit: str):
    """``commit``'s ``lmatlas/atlas/stages/neurons.py`` as a module (its registration left out)."""
    text = subprocess.run(
        ["git", "show", f"{commit}:lmatlas/atlas/stages/neurons.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_neurons_stage.py"
    path.write_text(text.replace("\nstage(\n", "\n_registered = (\n"))
    spec = importlib.util.spec_from_file_location("old_neurons_stage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_decoding(model, k: int = 20) -> NeuronDecoding:
    lay, gen = model.layout, torch.Generator().manual_seed(0)
    n = lay.n_layers * lay.d_mlp

    def ranking() -> TokenRanking:
        return TokenRanking(torch.randint(0, lay.d_vocab, (n, k), generator=gen), torch.randn(n, k, generator=gen))

    return NeuronDecoding(list(range(lay.n_layers)), lay.d_mlp, k, ranking(), ranking(), {"gate": ranking()})


def run(model_name: str, commit: str) -> dict:
    import duckdb

    model = load_model(model_name)
    decoding, stages = random_decoding(model), {"old": old_stage(commit), "new": new_stage}
    folder = Path(tempfile.mkdtemp(prefix="lmatlas-map-rows-"))
    stores = {side: AtlasStore.create_or_open(folder / f"{side}.duckdb", model.card()) for side in stages}
    ctxs = {side: BuildContext(corpus=torch.zeros(1, 1, dtype=torch.long)) for side in stages}
    seconds: dict[str, float] = {side: 0.0 for side in stages}
    for layer in range(model.layout.n_layers):
        for side in ("old", "new") if layer % 2 == 0 else ("new", "old"):
            ctxs[side].memo["neurons.decoding"] = decoding
            start = time.perf_counter()
            rows = stages[side].compute(model, f"neurons/L{layer}", ctxs[side])
            stores[side].commit_unit("neurons", f"neurons/L{layer}", rows, 0.0)
            seconds[side] += time.perf_counter() - start
    for store in stores.values():
        store.close()
    con = duckdb.connect()
    for side in stages:
        con.execute(f"ATTACH '{folder / f'{side}.duckdb'}' AS {side} (READ_ONLY)")
    only = {
        f"rows_only_in_{a}": con.execute(
            f"SELECT count(*) FROM (SELECT * FROM {a}.neurons EXCEPT ALL SELECT * FROM {b}.neurons)"
        ).fetchone()[0]
        for a, b in (("old", "new"), ("new", "old"))
    }
    return {
        "benchmark": "map_rows",
        "model": model_name,
        "commit_old": commit,
        "torch_threads": torch.get_num_threads(),
        "rows": model.layout.n_layers * model.layout.d_mlp,
        "seconds": {side: round(value, 2) for side, value in seconds.items()},
        "ratio_old_over_new": round(seconds["old"] / seconds["new"], 2),
        **only,
    }


def decode_interleaved(model, layers: int, rounds: int) -> dict:
    """Old (every input side) and new (the stored side) ``decode_neurons`` calls of the stage, alternated."""
    from lmatlas.decode.neurons import decode_neurons

    chosen = list(range(layers))
    side_inputs = {"old": True, "new": ["gate" if model.W.W_gate(0) is not None else "in"]}
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    found = {}
    decode_neurons(model, layers=[0], k=20, inputs=False, progress=False)  # warm-up: the kernel's one-time check
    for i in range(rounds):
        for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            found[side] = decode_neurons(model, layers=chosen, k=20, inputs=side_inputs[side], progress=False)
            seconds[side].append(time.perf_counter() - start)
    stored = side_inputs["new"][0]
    same = all(
        torch.equal(getattr(found["old"], name).ids, getattr(found["new"], name).ids)
        and torch.equal(getattr(found["old"], name).logits, getattr(found["new"], name).logits)
        for name in ("promoted", "suppressed")
    ) and torch.equal(found["old"].inputs[stored].ids, found["new"].inputs[stored].ids)
    total = {side: sum(values) for side, values in seconds.items()}
    return {
        "layers": layers,
        "rounds": rounds,
        "seconds": {side: [round(v, 2) for v in values] for side, values in seconds.items()},
        "ratio_old_over_new": round(total["old"] / total["new"], 2),
        "stored_rankings_identical": same,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--old", required=True, help="the commit whose neurons stage is compared")
    parser.add_argument("--record", default=None)
    parser.add_argument("--decode-layers", type=int, default=0, help="also time the stage's decoding on N layers")
    parser.add_argument("--rounds", type=int, default=2, help="decodings per side with --decode-layers")
    args = parser.parse_args(argv)
    before = conditions()
    result = run(args.model, args.old)
    if args.decode_layers:
        result["decode"] = decode_interleaved(load_model(args.model), args.decode_layers, args.rounds)
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
