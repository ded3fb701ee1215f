"""kvpress's presses on exported prompts: run inside ``.venv-kvpress`` by ``bench/kvcache_peers.py``, not by hand.

Reads the prompts (JSONL: task, length, index, prompt_ids, answer_ids, and per press the
compression ratio that matches an lmatlas plan's bytes), loads the model from a Hugging Face
directory with transformers < 5.3 (kvpress 0.5.5's requirement), and for every prompt:

* the full cache (a ``DynamicCache``): the reference of every pair;
* each press: the prompt is prefilled inside ``with press(model):`` (kvpress compresses during
  the prefill), then the scored tokens are fed outside the press, exactly as ``bench/kv_metrics.py``
  feeds them to lmatlas's caches (one at a time for answers, one forward for a continuation).

Each line written is the record ``bench/kv_metrics.py`` writes for lmatlas's methods; the bytes
are the storage the cache's tensors hold (deduplicated), so a press that masks (DuoAttention:
fake keys, every entry kept) reports what it really holds. This file imports nothing from
lmatlas (it runs against another transformers); its metric code mirrors ``kv_metrics.compare``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def storage_bytes(cache) -> int:
    seen = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def run(model, prompt, answer, press, step):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        if press is None:
            rows.append(model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[0, -1:])
        else:
            with press(model):
                rows.append(model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[0, -1:])
        prefill_s = time.perf_counter() - start
        held_prefill = storage_bytes(cache)
        start = time.perf_counter()
        fed = answer[:-1]
        chunk = len(fed) if step == 0 else 1
        for i in range(0, len(fed), max(1, chunk)):
            rows.append(model(input_ids=fed[i : i + chunk][None], past_key_values=cache, use_cache=True).logits[0])
        decode_s = time.perf_counter() - start
    logp = torch.log_softmax(torch.cat(rows).float(), -1)
    return logp, storage_bytes(cache), held_prefill, prefill_s, decode_s


def make_press(name: str, ratio: float, head_scores, sink: int, recent: int):
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=5)
    if name == "expected":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=sink)
    if name == "kvzip":
        return kvpress.KVzipPress(compression_ratio=ratio)
    if name == "duo":
        scores = torch.tensor(head_scores)

        class OurScores(kvpress.DuoAttentionPress):
            """kvpress's DuoAttention fed lmatlas's KV-head scores: the lowest ``ratio`` of heads stream."""

            def post_init_from_model(self, model):
                self.sink_size, self.recent_size = sink, recent
                n_pruned = round(scores.numel() * self.head_compression_ratio)
                self.streaming_mask = torch.zeros(scores.shape, dtype=torch.bool)
                order = scores.flatten().argsort()[:n_pruned]
                self.streaming_mask.view(-1)[order] = True

        return OurScores(head_compression_ratio=ratio)
    raise SystemExit(f"unknown press {name!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--records", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    out = Path(args.records)
    done = set()
    if out.exists():
        done = {
            (r["task"], r["length"], r["index"], r["method"]) for r in map(json.loads, out.read_text().splitlines())
        }
    with out.open("a") as sink:
        for line in Path(args.prompts).read_text().splitlines():
            item = json.loads(line)
            key = (item["task"], item["length"], item["index"])
            todo = [m for m in item["methods"] if (*key, m["method"]) not in done]
            if not todo:
                continue
            prompt, answer = torch.tensor([item["prompt_ids"]]), torch.tensor(item["answer_ids"])
            step = 0 if item["task"] == "continue" else 1
            full = run(model, prompt, answer, None, step)
            for m in todo:
                press = (
                    None
                    if m["press"] == "full"
                    else make_press(m["press"], m["ratio"], item.get("head_scores"), item["sink"], item["recent"])
                )
                logp, held, held_prefill, prefill_s, decode_s = (
                    full if press is None else run(model, prompt, answer, press, step)
                )
                lp, flp = logp.gather(-1, answer[:, None])[:, 0], full[0].gather(-1, answer[:, None])[:, 0]
                kl = (full[0].exp() * (full[0] - logp)).sum(-1)
                row = dict(zip(("task", "length", "index"), key), method=m["method"], ratio=m["ratio"])
                row.update(
                    logprob=round(float(lp.sum()), 5),
                    logprob_drop=round(float(flp.sum() - lp.sum()), 5),
                    correct=bool((logp.argmax(-1) == answer).all()),
                    kl=round(float(kl.mean()), 6),
                    kl_max=round(float(kl.max()), 6),
                    kv_bytes=held,
                    kv_bytes_prefill=held_prefill,
                    prefill_s=round(prefill_s, 4),
                    decode_s=round(decode_s, 4),
                    threads=torch.get_num_threads(),
                    load=os.getloadavg()[0],
                )
                sink.write(json.dumps(row) + "\n")
                sink.flush()


if __name__ == "__main__":
    main()
