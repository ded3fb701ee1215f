"""Layer skipping as analysis: how often a cheaper model agrees with the full one, and what it implies.

For token sequences (the model's own greedy continuations of some prompts, or any
text), teacher-forced once:

* **early exit** at layer ``l``: the argmax of ``final_norm(h_l) @ W_U``
  (:func:`~lmatlas.model.readout.exit_logits`) against the full model's argmax,
  at every position: the agreement ``a_l``;
* **layer skipping**: the same with a set of blocks bypassed (their attention and MLP
  writes zeroed, so the stream passes them unchanged), e.g. the least important blocks of
  an atlas (:func:`least_important_layers`).

A drafter that agrees with probability ``a`` (independently per token), drafting ``k``
tokens at a relative cost ``c`` per token (``c = l / N`` for an exit at ``l`` of ``N``),
yields ``E = (1 - a^(k+1)) / (1 - a)`` tokens per verifying forward at a cost of
``1 + k c`` forwards, so the implied speed-up is ``E / (1 + k c)`` (best ``k`` reported).
It assumes a verifying forward over ``k + 1`` tokens costs what a one-token forward
costs, which is optimistic on a CPU; below 1 the drafter can only slow decoding down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from lmatlas.errors import InputError
from lmatlas.model.generation import pad_token_id
from lmatlas.model.readout import LayerTap, exit_logits

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def implied_speedup(agreement: float, cost: float, max_draft: int = 8) -> tuple[float, int]:
    """``(speed-up, k)``: the best ``E / (1 + k c)`` over draft lengths ``k = 1 .. max_draft`` (below 1: a slowdown)."""
    best = (0.0, 0)
    for k in range(1, max_draft + 1):
        a = min(max(agreement, 0.0), 1.0 - 1e-9)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        best = max(best, (tokens / (1 + k * cost), k))
    return best


def _sequences(model: "Model", prompts: Sequence[str], new_tokens: int) -> list[torch.Tensor]:
    out = []
    for prompt in prompts:
        ids = model.tokenize(prompt)["input_ids"]
        with torch.no_grad():
            seq = model.hf.generate(
                input_ids=ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad_token_id(model.tokenizer)
            )
        out.append((seq, ids.shape[1]))
    return out


def acceptance_profile(
    model: "Model", prompts: Sequence[str], new_tokens: int = 64, skip_sets: dict[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """Early-exit agreement per layer (and per skipped-layer set) on the generated positions.

    Returns ``{"positions", "early_exit": [{"layer", "agreement", "speedup", "draft_len"}],
    "skipped": [{"name", "layers", "agreement", "speedup", "draft_len"}]}``.
    """
    if not prompts:
        raise InputError("acceptance_profile needs at least one prompt.")
    n = model.layout.n_layers
    layers = list(range(1, n))
    agree = torch.zeros(len(layers))
    skip_sets = dict(skip_sets or {})
    for name, skipped in skip_sets.items():
        if not skipped or any(not 0 <= int(l) < n for l in skipped):
            raise InputError(f"Skipped-layer set {name!r}: layers must be in 0..{n - 1} and not empty.")
    skip_agree = {name: 0 for name in skip_sets}
    total = 0
    with torch.no_grad():
        for seq, prompt_len in _sequences(model, prompts, new_tokens):
            with LayerTap(model.hf, layers, positions="all") as tap:
                final = model.hf(input_ids=seq, use_cache=False).logits[0].argmax(-1)  # [pos]
            span = slice(prompt_len - 1, seq.shape[1] - 1)  # positions whose next token was generated
            target = final[span]
            total += int(target.numel())
            for i, layer in enumerate(layers):
                agree[i] += int((exit_logits(model.hf, tap.last[layer][0, span]).argmax(-1) == target).sum())
            for name, skipped in skip_sets.items():
                replace = {}
                for layer in skipped:
                    replace[f"L{int(layer)}.attn.z"] = 0.0
                    replace[f"L{int(layer)}.mlp.out"] = 0.0
                logits = model.run(seq, replace=replace).logits[0, span]
                skip_agree[name] += int((logits.argmax(-1) == target).sum())
    rows = []
    for i, layer in enumerate(layers):
        a = float(agree[i]) / max(total, 1)
        speedup, k = implied_speedup(a, layer / n)
        rows.append({"layer": layer, "agreement": a, "speedup": speedup, "draft_len": k})
    skipped_rows = []
    for name, skipped in skip_sets.items():
        a = skip_agree[name] / max(total, 1)
        speedup, k = implied_speedup(a, (n - len(skipped)) / n)
        skipped_rows.append(
            {
                "name": name,
                "layers": sorted(int(l) for l in skipped),
                "agreement": a,
                "speedup": speedup,
                "draft_len": k,
            }
        )
    return {"positions": total, "layers": n, "early_exit": rows, "skipped": skipped_rows}


def least_important_layers(atlas: Any, fraction: float = 0.2) -> list[int]:
    """The ``fraction`` of blocks that matter least in an atlas: the smallest ``|MLP delta_loss|`` plus
    ``sum |head delta_loss|`` (a negative loss change is still a change)."""
    from lmatlas.atlas import Atlas

    atlas = Atlas.open(atlas) if isinstance(atlas, str) else atlas
    rows = atlas.sql(
        "SELECT m.layer, abs(m.delta_loss) + COALESCE(h.total, 0) AS importance FROM mlp_importance m "
        "LEFT JOIN (SELECT layer, SUM(abs(delta_loss)) AS total FROM head_importance GROUP BY layer) h "
        "ON m.layer = h.layer ORDER BY importance"
    ).to_pylist()
    if not rows:
        raise InputError("This atlas has no importance tables: build it with the importance stage.")
    count = max(1, round(fraction * len(rows)))
    return sorted(int(r["layer"]) for r in rows[:count])
