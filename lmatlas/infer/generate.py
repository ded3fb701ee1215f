"""Generate with a KV plan and measure it: tokens, bytes held, time and peak memory per phase.

>>> import lmatlas                                                     # doctest: +SKIP
>>> from lmatlas.infer.generate import generate_kv                     # doctest: +SKIP
>>> out = generate_kv(lmatlas.load(), "Once upon a time", budget=0.25, atlas="smollm2.atlas.duckdb")  # doctest: +SKIP
>>> out.text, out.kv_bytes, out.decode_tokens_per_s                    # doctest: +SKIP

:func:`greedy` is a plain greedy loop (one prefill forward, then one forward per
token) so that prefill and decode can be timed and their peaks measured apart; its
tokens equal ``model.hf.generate(..., do_sample=False, past_key_values=cache)`` (the
tests check this). ``cache=None`` runs transformers' default ``DynamicCache``, the
baseline every measurement is compared with.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from lmatlas.errors import LmatlasError
from lmatlas.infer import choose
from lmatlas.infer.cache import make_cache
from lmatlas.infer.memory import PeakMemory, cache_nbytes
from lmatlas.infer.plan import KVPlan
from lmatlas.infer.snap import SnapPlan
from lmatlas.model.generation import check_unpadded

if TYPE_CHECKING:
    from lmatlas.model.handle import Inputs, Model


@dataclass
class GenerationResult:
    """One greedy generation and its measurements (bytes are storage actually held)."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    kv_bytes: int  # held by the cache at the end
    kv_bytes_prefill: int  # held right after the prefill
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float | None
    peak_prefill_bytes: int | None = None  # resident memory the prefill added at its peak
    peak_decode_bytes: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def greedy(
    model: "Model",
    input_ids: torch.Tensor,
    cache=None,
    max_new_tokens: int = 16,
    measure_memory: bool = False,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Greedy decoding of ``input_ids`` ``[batch=1, pos]`` with ``cache`` (``None``: the default cache)."""
    cache = cache if cache is not None else DynamicCache(config=model.hf.config)
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos and model.tokenizer is not None else None
    tokens: list[int] = []
    with torch.no_grad():
        with PeakMemory() if measure_memory else nullcontext() as peak_prefill:
            start = time.perf_counter()
            logits = model.hf(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            prefill_s = time.perf_counter() - start
        kv_prefill = cache_nbytes(cache)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        with PeakMemory() if measure_memory else nullcontext() as peak_decode:
            start = time.perf_counter()
            for step in range(max_new_tokens):
                tokens.append(int(next_token))
                if (eos is not None and tokens[-1] == eos) or step == max_new_tokens - 1:
                    break
                logits = model.hf(next_token, past_key_values=cache, use_cache=True).logits
                next_token = logits[:, -1].argmax(-1, keepdim=True)
            decode_s = time.perf_counter() - start
    steps = len(tokens) - 1  # forwards run in the decode loop
    text = model.tokenizer.decode(tokens, skip_special_tokens=True) if model.tokenizer is not None else ""
    return GenerationResult(
        text=text,
        tokens=tokens,
        prompt_tokens=int(input_ids.shape[1]),
        kv_bytes=cache_nbytes(cache),
        kv_bytes_prefill=kv_prefill,
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else None,
        peak_prefill_bytes=getattr(peak_prefill, "added", None),
        peak_decode_bytes=getattr(peak_decode, "added", None),
        plan=cache.plan.describe() if hasattr(cache, "plan") else {"method": "default"},
    )


def resolve_plan(
    model: "Model",
    budget: float | None = None,
    atlas: str | Path | None = None,
    sink: int = 4,
    recent: int = 256,
    seed: int | None = None,
) -> KVPlan | None:
    """The plan the CLI options describe: ``None`` (default cache) when no budget is given;
    from ``atlas`` when given, else random heads with ``seed`` (or uniform for budget 0)."""
    if budget is None:
        return None
    choose.check_budget(budget)
    if atlas is not None:
        return choose.from_atlas(model, atlas, budget, sink=sink, recent=recent)
    if budget == 0:
        return choose.uniform(model, sink, recent)
    if budget == 1:
        return choose.every_head(model)
    if seed is None:
        raise LmatlasError(
            "A KV budget between 0 and 1 needs a way to choose the heads: pass an atlas (--atlas FILE, built by "
            "`lmatlas map`) or --random-seed N for random heads."
        )
    return choose.random_plan(model, budget, seed, sink, recent)


def generate_kv(
    model: "Model",
    prompt: "Inputs",
    plan: KVPlan | SnapPlan | None = None,
    budget: float | None = None,
    atlas: str | Path | None = None,
    sink: int = 4,
    recent: int = 256,
    seed: int | None = None,
    max_new_tokens: int = 32,
    measure_memory: bool = True,
) -> GenerationResult:
    """Greedy generation of one prompt with a head-wise cache (``plan``, or one made from the other options)."""
    batch = model.tokenize(prompt)
    check_unpadded(batch, "The head-wise KV cache")
    if batch["input_ids"].shape[0] != 1:
        raise LmatlasError("generate_kv runs one prompt at a time; pass a single string.")
    if plan is None:
        plan = resolve_plan(model, budget, atlas, sink, recent, seed)
    cache = make_cache(model, plan) if plan is not None else None
    return greedy(model, batch["input_ids"], cache, max_new_tokens, measure_memory=measure_memory)
