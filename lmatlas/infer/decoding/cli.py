"""One entry point per decoding strategy, for the ``generate`` command (and any caller).

    generate_with_strategy(model, "Why is the sky blue?", "speculative", "prompt-lookup", 64, chat=True)

returns a JSON-ready dict: ``strategy``, ``drafter``, ``text``, ``token_ids``,
``new_tokens``, ``seconds``, ``tokens_per_s`` and what the strategy reports (DoLa: the
premature layer of each step; DeCoRe: the masked heads and each step's alpha;
speculative: the mean accepted length and the acceptance rate). Every argument is
checked before any compute.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from lmatlas.errors import InputError

STRATEGIES = ("greedy", "dola", "decore", "speculative")


def generate_with_strategy(
    model: Any, prompt: str, strategy: str, drafter: str | None = None, max_new_tokens: int = 32,
    chat: bool = False, *, heads: Sequence[str] | None = None, draft_len: int = 4,
    heads_path: str | None = None, premature_layers: Any = "high",
) -> dict[str, Any]:
    """Decode ``prompt`` with ``strategy`` (``greedy``, ``dola``, ``decore``, ``speculative``)."""
    from lmatlas.edit.generation import prompt_ids

    if strategy not in STRATEGIES:
        raise InputError(f"Unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    if drafter is not None and strategy != "speculative":
        raise InputError(f"--drafter goes with --strategy speculative, not {strategy}.")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: generate at least one token.")
    if not isinstance(prompt, str) or not prompt:
        raise InputError("The prompt is empty: pass some text.")
    report: dict[str, Any] = {"strategy": strategy, "drafter": drafter}
    start = time.perf_counter()
    if strategy == "dola":
        from lmatlas.infer.decoding.dola import generate_dola

        out = generate_dola(model, prompt, max_new_tokens, premature_layers=premature_layers, chat=chat)
        report.update(premature_layers=out["premature_layers"], candidates=out["candidates"])
    elif strategy == "decore":
        from lmatlas.infer.decoding.decore import generate_decore

        out = generate_decore(model, prompt, max_new_tokens, heads=heads, chat=chat)
        report.update(heads=out["heads"], alphas=out["alphas"])
    elif strategy == "speculative":
        from lmatlas.infer.decoding.drafters import make_drafter
        from lmatlas.infer.decoding.speculative import speculative_generate

        if draft_len < 1:
            raise InputError(f"draft_len={draft_len}: draft at least one token per round.")
        report["drafter"] = drafter = drafter or "prompt-lookup"
        chosen = make_drafter(model, drafter, heads_path=heads_path)
        ids = prompt_ids(model, prompt, chat)["input_ids"]
        start = time.perf_counter()
        result = speculative_generate(model, ids, chosen, max_new_tokens, draft_len=draft_len)
        out = {"token_ids": result.token_ids,
               "text": model.tokenizer.decode(result.token_ids, skip_special_tokens=True)}
        report.update(mean_accepted_length=result.mean_accepted_length, acceptance_rate=result.acceptance_rate,
                      verify_forwards=len(result.accepted), draft_len=draft_len)
    else:
        batch = prompt_ids(model, prompt, chat)
        import torch

        with torch.no_grad():
            seq = model.hf.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=model.tokenizer.eos_token_id or 0)
        new = seq[0, batch["input_ids"].shape[1]:].tolist()
        out = {"token_ids": new, "text": model.tokenizer.decode(new, skip_special_tokens=True)}
    seconds = time.perf_counter() - start
    report.update(text=out["text"], token_ids=out["token_ids"], new_tokens=len(out["token_ids"]),
                  seconds=seconds, tokens_per_s=len(out["token_ids"]) / max(seconds, 1e-9))
    return report
