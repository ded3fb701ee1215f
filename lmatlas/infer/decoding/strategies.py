"""Decoding strategies as values, registered once: what ``lmatlas.generate(strategy=...)`` runs.

======================  ====================================================================
``greedy`` (``None``)   transformers' own ``generate`` (greedy unless ``do_sample=True``)
``dola``                :class:`Dola` — contrast the final layer with an earlier one
``decore``              :class:`DeCoRe` — contrast with the model whose retrieval heads are masked
``speculative``         :class:`Speculative` — draft and verify, output identical to greedy
======================  ====================================================================

Each is a frozen dataclass with the :class:`~lmatlas.model.generation.Strategy` protocol:
``check(model, batch, kv, hf)`` refuses, before any compute, what it cannot serve (with
the reason), and ``decode(model, batch, max_new_tokens, new_cache, hf)`` runs inside the
edit's hook session with caches made by the KV policy (``new_cache()``; ``None`` = the
model's default cache). :data:`STRATEGIES` is the table the CLI's ``--strategy`` choices
and the explorer's schema are read from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from lmatlas.errors import InputError
from lmatlas.model.generation import CacheFactory, Decoded, check_unpadded, pad_token_id

if TYPE_CHECKING:
    from lmatlas.model.generation import KVPolicy
    from lmatlas.model.handle import Model

Layers = Union[str, Sequence[int], None]


def _greedy_only(name: str, hf: dict) -> None:
    if hf.get("do_sample"):
        raise InputError(f"{name} decodes greedily: drop do_sample=True.")
    if hf.get("num_beams", 1) not in (None, 1):
        raise InputError(
            f"{name} decodes greedily one sequence at a time: beam search (num_beams="
            f"{hf['num_beams']}) is not supported; drop num_beams."
        )


def _one_sequence(name: str, batch: dict[str, torch.Tensor]) -> None:
    if batch["input_ids"].shape[0] != 1:
        raise InputError(f"{name} decodes one prompt at a time: pass a single string.")


def _hf_kwargs(cache: Any, hf: dict) -> dict:
    return {**({"past_key_values": cache} if cache is not None else {}), **hf}


@dataclass(frozen=True)
class Dola:
    """DoLa (:mod:`lmatlas.infer.decoding.dola`): ``premature_layers`` ``"low"``, ``"high"`` or a list;
    ``top_k``: read the premature layers on the final layer's top-k tokens only (the cheaper variant,
    :func:`~lmatlas.infer.decoding.dola.top_k_scores`; ``None`` = the published method)."""

    premature_layers: Layers = "high"
    relative_top: float = 0.1
    repetition_penalty: float = 1.2
    top_k: Optional[int] = None
    name: str = field(default="dola", init=False)

    def check(self, model: "Model", batch: dict, kv: "KVPolicy | None", hf: dict) -> None:
        from lmatlas.infer.decoding.dola import candidate_layers

        _greedy_only("DoLa", hf)
        if not 0.0 < self.relative_top <= 1.0:
            raise InputError(f"relative_top={self.relative_top}: the plausibility threshold must be in (0, 1].")
        candidate_layers(model.hf, self.premature_layers)
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k={self.top_k}: score at least one token (or None for the whole vocabulary).")

    def decode(self, model: "Model", batch: dict, max_new_tokens: int, new_cache: CacheFactory, hf: dict) -> Decoded:
        from lmatlas.infer.decoding.dola import DolaTrace, dola_generate

        trace, cache = DolaTrace(), new_cache()
        out = model.hf.generate(
            **batch,
            custom_generate=dola_generate,
            premature_layers=self.premature_layers,
            relative_top=self.relative_top,
            dola_trace=trace,
            repetition_penalty=self.repetition_penalty,
            dola_top_k=self.top_k,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id(model.tokenizer),
            **_hf_kwargs(cache, hf),
        )
        report = {"premature_layers": [step[0] for step in trace.layers], "candidates": trace.candidates}
        return Decoded(out[:, batch["input_ids"].shape[1] :], report, cache)


@dataclass(frozen=True)
class DeCoRe:
    """DeCoRe (:mod:`lmatlas.infer.decoding.decore`): ``heads`` masked (default: the census's top
    ``top`` retrieval heads, found when decoding starts); ``alpha_cap`` caps the entropy weight."""

    heads: Optional[tuple[str, ...]] = None
    alpha_cap: Optional[float] = None
    top: int = 10
    name: str = field(default="decore", init=False)

    def check(self, model: "Model", batch: dict, kv: "KVPolicy | None", hf: dict) -> None:
        from lmatlas.infer.decoding.decore import head_names

        _greedy_only("DeCoRe", hf)
        check_unpadded(batch, "DeCoRe")
        if self.heads is not None:
            head_names(model, self.heads)

    def decode(self, model: "Model", batch: dict, max_new_tokens: int, new_cache: CacheFactory, hf: dict) -> Decoded:
        from lmatlas.infer.decoding.decore import decore_generate, head_names, retrieval_heads

        heads = head_names(model, retrieval_heads(model, self.top) if self.heads is None else self.heads)
        alphas: list[float] = []
        cache = new_cache()
        out = model.hf.generate(
            **batch,
            custom_generate=decore_generate,
            lmatlas_model=model,
            masked_heads=heads,
            masked_cache=new_cache(),
            alpha_cap=self.alpha_cap,
            decore_trace=alphas,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id(model.tokenizer),
            **_hf_kwargs(cache, hf),
        )
        return Decoded(out[:, batch["input_ids"].shape[1] :], {"heads": heads, "alphas": alphas}, cache)


@dataclass(frozen=True)
class Speculative:
    """Draft and verify (:mod:`lmatlas.infer.decoding.speculative`) with a drafter from
    :data:`~lmatlas.infer.decoding.drafters.DRAFTERS`; the output is greedy decoding's.

    ``draft_len`` defaults to 2: on a CPU a forward over more tokens costs more (matrix-matrix kernels),
    and prompt lookup with 2 drafts beat 4 on SmolLM2's chat prompts (bench/results/decoding_speculative.json);
    on a GPU, where a few more tokens cost little, longer drafts may pay."""

    drafter: str = "prompt-lookup"
    draft_len: int = 2
    heads_path: Optional[str] = None  # the ``heads`` drafter's file
    layers: Optional[int] = None  # the ``early-exit`` drafter's depth
    name: str = field(default="speculative", init=False)

    def check(self, model: "Model", batch: dict, kv: "KVPolicy | None", hf: dict) -> None:
        from lmatlas.infer.decoding.drafters import DRAFTERS

        if self.draft_len < 1:
            raise InputError(f"draft_len={self.draft_len}: draft at least one token per round.")
        if self.drafter not in DRAFTERS:
            raise InputError(f"Unknown drafter {self.drafter!r}: use one of {', '.join(DRAFTERS)}.")
        _greedy_only("Speculative decoding", hf)
        _one_sequence("Speculative decoding", batch)
        unknown = sorted(set(hf) - {"do_sample", "num_beams"})
        if unknown:
            raise InputError(f"Speculative decoding runs its own loop: {', '.join(unknown)} cannot be passed to it.")
        reason = DRAFTERS[self.drafter].refuses(kv)
        if reason:
            raise InputError(reason)

    def decode(self, model: "Model", batch: dict, max_new_tokens: int, new_cache: CacheFactory, hf: dict) -> Decoded:
        from lmatlas.infer.decoding.drafters import make_drafter
        from lmatlas.infer.decoding.speculative import speculative_generate

        drafter = make_drafter(model, self.drafter, layers=self.layers, heads_path=self.heads_path)
        cache = new_cache()
        result = speculative_generate(
            model, batch["input_ids"], drafter, max_new_tokens, draft_len=self.draft_len, cache=cache
        )
        report = {
            "drafter": self.drafter,
            "draft_len": self.draft_len,
            "mean_accepted_length": result.mean_accepted_length,
            "acceptance_rate": result.acceptance_rate,
            "verify_forwards": len(result.accepted),
        }
        return Decoded(torch.tensor([result.token_ids], device=batch["input_ids"].device), report, cache)


#: Every strategy by name (``greedy`` is transformers' own loop: no value).
STRATEGIES = MappingProxyType({"greedy": None, "dola": Dola, "decore": DeCoRe, "speculative": Speculative})


def make_strategy(strategy: Any) -> Any:
    """A strategy value from a name in :data:`STRATEGIES` (default options), or the value itself."""
    if strategy is None or not isinstance(strategy, str):
        return strategy
    if strategy not in STRATEGIES:
        raise InputError(f"Unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    kind = STRATEGIES[strategy]
    return kind() if kind is not None else None
