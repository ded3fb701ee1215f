"""Benchmark: what each full-attention layer kept full costs, in bytes really held, on a model with one KV head.

On Gemma-3-270M every layer has one KV head, so a head-wise plan chooses whole layers, and
only its full-attention layers (3 of 18) are choosable: the 15 sliding layers keep the
model's own window (``sliding_window`` entries) under every method. This script prefills one
essay prompt of ``--length`` tokens with the default cache and with head-wise plans keeping
0, 1, 2 and all of the full-attention layers full (the others windowed at ``sink + recent``),
then decodes one token, and records the storage each cache holds after the prefill and after
the step (``lmatlas.infer.memory.cache_nbytes``: storages, positions included), per layer
too. Accuracy is not measured here (``bench/kvcache.py`` does); bytes do not depend on load.

    python bench/kvcache_layer_bytes.py --model gemma3-270m --length 4096 \\
        --out bench/results/kvcache_layer_bytes_gemma3-270m.json
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import Log, conditions, load_model, write_record  # noqa: E402
from transformers.cache_utils import DynamicCache

from lmatlas.infer.memory import cache_nbytes, storage_nbytes
from lmatlas.infer.needle import Haystack
from lmatlas.infer.plan import choosable_layers, layer_types, make_plan


def layer_bytes(cache) -> list[int]:
    """Storage bytes each layer of ``cache`` holds (a layer's tensors, deduplicated by storage)."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "tensors"):
            tensors = list(layer.tensors())
        else:
            tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        out.append(storage_nbytes(tensors))
    return out


def measure(model, ids: torch.Tensor, cache) -> dict:
    """Prefill ``ids`` then decode one token; the bytes held after each, in total and per layer."""
    with torch.no_grad():
        start = time.perf_counter()
        logits = model.hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        prefill_s = time.perf_counter() - start
        after_prefill, per_layer_prefill = cache_nbytes(cache), layer_bytes(cache)
        model.hf(logits[:, -1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
    return {
        "kv_bytes_after_prefill": after_prefill,
        "kv_bytes": cache_nbytes(cache),
        "layer_bytes_after_prefill": per_layer_prefill,
        "layer_bytes": layer_bytes(cache),
        "prefill_s": round(prefill_s, 2),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--counts", type=int, nargs="*", default=None, help="numbers of full layers kept (default: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log("kvcache_layer_bytes")
    model = load_model(args.model)
    before = conditions()
    haystack = Haystack(model.tokenizer)
    bos = list(model.tokenizer("", add_special_tokens=True)["input_ids"])
    ids = torch.tensor([bos + list(haystack.ids[: args.length - len(bos)])])
    layers = choosable_layers(model)
    rows = [{"method": "default", "full_layers": layers, **measure(model, ids, DynamicCache(config=model.hf.config))}]
    log(f"default: {rows[0]['kv_bytes']} bytes")
    for count in args.counts if args.counts is not None else range(len(layers) + 1):
        full = [(layer, kv) for layer in layers[:count] for kv in range(model.layout.n_kv_heads)]
        plan = make_plan(model, full, args.sink, args.recent, method=f"{count} full layers")
        rows.append(
            {"method": plan.method, "full_layers": layers[:count], **measure(model, ids, plan.make_cache(model))}
        )
        log(f"{plan.method}: {rows[-1]['kv_bytes']} bytes")
    last = layers[-1]  # windowed in every plan but the one keeping every layer full
    windowed = [r["layer_bytes"][last] for r in rows[1:] if last not in r["full_layers"]]
    per_layer = {
        "full_layer_bytes": rows[0]["layer_bytes"][last],  # the default cache's: every entry
        "windowed_layer_bytes": windowed[0] if windowed else None,
    }
    if per_layer["windowed_layer_bytes"] is not None:
        per_layer["freed_per_layer_windowed"] = per_layer["full_layer_bytes"] - per_layer["windowed_layer_bytes"]
    record = {
        "benchmark": "kvcache-layer-bytes",
        "model": model.provenance.source,
        "length": args.length,
        "sink": args.sink,
        "recent": args.recent,
        "layer_types": layer_types(model),
        "choosable_layers": layers,
        "n_kv_heads": model.layout.n_kv_heads,
        "sliding_window": getattr(model.hf.config, "sliding_window", None),
        "rows": rows,
        "per_layer": per_layer,
        "ratio_vs_default": {r["method"]: round(rows[0]["kv_bytes"] / r["kv_bytes"], 3) for r in rows},
        "sliding_layers_bytes": sum(
            b for b, kind in zip(rows[0]["layer_bytes"], layer_types(model)) if kind != "full_attention"
        ),
    }
    write_record(args.out, record, before)
    log(f"written {args.out}")


if __name__ == "__main__":
    main()
