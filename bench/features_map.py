"""Benchmark: the atlas stage ``features`` for one dictionary (default: SmolLM2-135M, 16,384 latents at L15.resid.post).

The dictionary is a seeded random TopK SAE (unit-norm decoder rows, ``k`` = 32): the stage's cost
does not depend on what the latents mean, only on their number, the model and the corpus. It
measures the stage's wall time over the default build corpus, split into its parts (the corpus
pass that encodes every position, decoding every latent through the vocabulary, the links to
heads and neurons, the rows), its peak resident memory and the rows written. The baseline is
one plain forward pass over the same corpus (``corpus_forward_s``), measured in the same run.
``--parts`` then runs each part of the unit again on its own and times it (``parts_s``).

    .venv/bin/python bench/features_map.py [--model smollm2-135m] [--site L15.resid.post] [--latents 16384]
                                           [--parts] [--record bench/results/features_map.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import conditions, corpus_forward_seconds, emit, load_model, peak_rss_mb, release_and_reset_peak  # noqa: E402

from lmatlas.atlas.pipeline import DEFAULT_PARAMS, build_atlas, make_context
from lmatlas.features.dictionary import DictionaryCard, TopKSAE


def random_sae(d_model: int, latents: int, k: int, site: str, seed: int = 0) -> TopKSAE:
    """A seeded random TopK SAE with unit-norm decoder rows (encoder = decoder transposed, as at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_model, latents, k, card=DictionaryCard("sae", site, d_model, latents, k))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(latents, d_model, generator=generator))
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def parts(model, entry, ctx) -> dict[str, float]:
    """Seconds of each part of one unit, run one after the other (as :func:`compute` does)."""
    from lmatlas.atlas.stages.features import _context_rows, _feature_rows
    from lmatlas.features.links import feature_links
    from lmatlas.features.sites import corpus_activations, decoded_tokens, decoder_rows

    out = {}
    start = time.perf_counter()
    acts = corpus_activations(model, entry, ctx.corpus, DEFAULT_PARAMS["batch"], DEFAULT_PARAMS["top_contexts"])
    out["corpus_pass_s"] = time.perf_counter() - start
    rows = decoder_rows(entry)
    start = time.perf_counter()
    decoded_tokens(model, rows, DEFAULT_PARAMS["top_k"])
    out["decoded_tokens_s"] = time.perf_counter() - start
    start = time.perf_counter()
    feature_links(model, entry.site, rows)
    out["links_s"] = time.perf_counter() - start
    start = time.perf_counter()
    _feature_rows(model, entry, acts, rows, DEFAULT_PARAMS["top_k"])
    _context_rows(model, entry, acts, ctx.corpus)
    out["rows_s"] = time.perf_counter() - start
    return {key: round(value, 2) for key, value in out.items()}


def measure(model_name: str, site: str, latents: int, k: int, split: bool = False) -> dict:
    model = load_model(model_name)
    ctx = make_context(model)
    corpus_forward_s = corpus_forward_seconds(model, ctx.corpus)
    sae = random_sae(model.layout.d_model, latents, k, site)
    name = model.dictionaries.attach(sae, site)
    release_and_reset_peak()
    path = Path(tempfile.mkdtemp(prefix="lmatlas-features-")) / "atlas.duckdb"
    start = time.perf_counter()
    report = build_atlas(model, path, only=["features"], progress=False)
    build_s = time.perf_counter() - start
    peak = peak_rss_mb()
    from lmatlas.atlas import Atlas

    with Atlas.open(path) as atlas:
        counts = {table: atlas.count(table) for table in ("features", "feature_contexts", "feature_links")}
    split = parts(model, model.dictionaries.get(model.sites(name)[0]), ctx) if split else None
    return {
        "benchmark": "features_map",
        "model": model_name or "smollm2-135m",
        "site": site,
        "latents": latents,
        "k": k,
        "torch_threads": torch.get_num_threads(),
        "corpus_tokens": int(ctx.corpus.numel()),
        "corpus_forward_s": round(corpus_forward_s, 3),
        "stage_s": round(build_s, 1),
        "unit_s": round(report.seconds_by_stage.get("features", 0.0), 1),
        "ratio_vs_corpus_forward": round(build_s / corpus_forward_s, 1),
        "parts_s": split,
        "rows": counts,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "peak_rss_mb": round(peak, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="L15.resid.post")
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--parts", action="store_true", help="then time each part of the unit again, one by one")
    parser.add_argument("--record", default=None, help="write the result with its conditions to this JSON file")
    args = parser.parse_args(argv)
    before = conditions()
    result = measure(args.model, args.site, args.latents, args.k, args.parts)
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
