"""Paired per-trial metrics of a KV policy against the full cache, and paired bootstrap intervals.

:func:`score` runs one prompt through a cache and returns, at every position that predicts a
scored token (the answer, or a held-out continuation), the log-probability of that token and
the whole next-token log-distribution:

* the prompt is one forward (``logits_to_keep=1``): it predicts the first scored token;
* the scored tokens are then fed teacher-forced, one at a time (``step=1``: decoding, for the
  short answers) or in one forward (the 256-token continuation: for head-wise plans the same
  as decoding them one by one; a scorer such as SnapKV votes again on that chunk).

Per trial the benchmark records ``logprob`` (summed over the scored tokens), ``correct``
(greedy would write the answer: every scored token is the argmax) and, paired with the full
cache's distributions on the same prompt, ``kl`` (mean over positions of KL(full || method),
nats) and ``kl_max``. :func:`paired_bootstrap` gives the mean difference from the full cache
with a percentile interval, resampling trials (the pairs stay together).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch
from intervals import wilson  # noqa: E402  (bench/ is on the path)
from transformers.cache_utils import DynamicCache

from lmatlas.infer.memory import cache_nbytes


@dataclass
class Scored:
    """``logp`` ``[n, vocab]`` float32 log-distributions predicting the ``n`` scored tokens, and the costs."""

    logp: torch.Tensor
    token_logprob: torch.Tensor  # [n]
    kv_bytes: int
    kv_bytes_prefill: int
    prefill_s: float
    decode_s: float


def score(model, prompt_ids, answer_ids, cache=None, step: int = 1) -> Scored:
    """Teacher-forced scoring of ``answer_ids`` after ``prompt_ids`` with ``cache`` (``None``: the full cache)."""
    cache = cache if cache is not None else DynamicCache(config=model.hf.config)
    prompt = torch.tensor([list(prompt_ids)])
    answer = torch.tensor(list(answer_ids))
    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        rows.append(model.hf(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1:])
        prefill_s = time.perf_counter() - start
        kv_prefill = cache_nbytes(cache)
        start = time.perf_counter()
        fed = answer[:-1]
        chunk = max(1, step) if step > 0 else max(1, len(fed))
        for i in range(0, len(fed), chunk):
            piece = fed[i : i + chunk][None]
            rows.append(model.hf(piece, past_key_values=cache, use_cache=True).logits[0])
        decode_s = time.perf_counter() - start
    logp = torch.log_softmax(torch.cat(rows).float(), dim=-1)
    return Scored(logp, logp.gather(-1, answer[:, None])[:, 0], cache_nbytes(cache), kv_prefill, prefill_s, decode_s)


def compare(full: Scored, other: Scored, trial) -> dict:
    """The per-trial record of ``other`` paired with ``full`` on the same prompt (``trial``: a ``kv_tasks.Task``).

    ``logprob`` and ``correct`` read the answer's content tokens (``trial.content``; all when empty);
    ``chosen``: at ``trial.choice_at`` (the answer's first digit) the answer's token is the likeliest of
    ``trial.choices`` (the first digits of every number of its kind in the prompt); ``None`` without choices.
    """
    answer = torch.tensor(list(trial.answer_ids))
    keep = torch.tensor(list(trial.content)) if trial.content else torch.ones(len(answer), dtype=torch.bool)
    kl = (full.logp.exp() * (full.logp - other.logp)).sum(-1)  # [n] KL(full || other)
    right = other.logp.argmax(-1) == answer
    chosen = None
    if trial.choices:
        chosen = bool(other.logp[trial.choice_at, list(trial.choices)].argmax() == 0)
    return {
        "logprob": round(float(other.token_logprob[keep].sum()), 5),
        "logprob_drop": round(float(full.token_logprob[keep].sum() - other.token_logprob[keep].sum()), 5),
        "correct": bool(right[keep].all()),
        "chosen": chosen,
        "kl": round(float(kl.mean()), 6),
        "kl_max": round(float(kl.max()), 6),
        "kv_bytes": other.kv_bytes,
        "kv_bytes_prefill": other.kv_bytes_prefill,
        "prefill_s": round(other.prefill_s, 4),
        "decode_s": round(other.decode_s, 4),
    }


def paired_bootstrap(diffs: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the paired differences and its percentile bootstrap interval (trials resampled)."""
    if not diffs:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return {"mean": round(statistics.fmean(diffs), 5), "low": round(lo, 5), "high": round(hi, 5), "n": n}


def chosen_summary(rs: list[dict], base: list[dict]) -> dict:
    """Accuracy of the choice among the prompt's numbers (``chosen``), its Wilson interval and paired difference."""
    pairs = [(r["chosen"], b["chosen"]) for r, b in zip(rs, base) if r.get("chosen") is not None]
    if not pairs:
        return {}
    k = sum(c for c, _ in pairs)
    return {
        "choice_accuracy": round(k / len(pairs), 4),
        "choice_wilson": [round(x, 4) for x in wilson(k, len(pairs))],
        "choice_diff": paired_bootstrap([c - b for c, b in pairs]),
    }


def summarise(records: list[dict]) -> list[dict]:
    """One row per (task, length, method): accuracy, bytes and every paired difference from ``full``."""
    rows = []
    cells = sorted({(r["task"], r["length"]) for r in records})
    for task, length in cells:
        cell = [r for r in records if r["task"] == task and r["length"] == length]
        full = {r["index"]: r for r in cell if r["method"] == "full"}
        for method in dict.fromkeys(r["method"] for r in cell):
            rs = [r for r in cell if r["method"] == method and r["index"] in full]
            if not rs:
                continue
            base = [full[r["index"]] for r in rs]
            bytes_ = statistics.fmean(r["kv_bytes"] for r in rs)
            full_bytes = statistics.fmean(b["kv_bytes"] for b in base)
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "method": method,
                    "trials": len(rs),
                    "accuracy": round(statistics.fmean(r["correct"] for r in rs), 4),
                    "accuracy_wilson": [round(x, 4) for x in wilson(sum(r["correct"] for r in rs), len(rs))],
                    **chosen_summary(rs, base),
                    "accuracy_diff": paired_bootstrap([r["correct"] - b["correct"] for r, b in zip(rs, base)]),
                    "logprob_drop": paired_bootstrap([r["logprob_drop"] for r in rs]),
                    "kl": paired_bootstrap([r["kl"] for r in rs]),
                    "kv_bytes": round(bytes_),
                    "kv_ratio_vs_full": round(full_bytes / bytes_, 3) if bytes_ else None,
                    "prefill_s_median": round(statistics.median(r["prefill_s"] for r in rs), 4),
                    "decode_s_median": round(statistics.median(r["decode_s"] for r in rs), 4),
                    "threads": sorted({r.get("threads") for r in rs if r.get("threads") is not None}),
                    "load_range": [min(r["load"] for r in rs), max(r["load"] for r in rs)] if "load" in rs[0] else None,
                }
            )
    return rows
