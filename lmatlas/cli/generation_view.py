"""What ``lmatlas generate`` prints: a continuation with its log-probabilities, two side by side, a report.

The command (:mod:`lmatlas.cli.generate_commands`) decides what to run; this module shows it.
Control characters in generated text are escaped (a form feed must not clear the terminal),
and a long prompt is never echoed whole (:func:`title`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import key_value_table, out

if TYPE_CHECKING:
    from lmatlas.model.comparison import Comparison, Continuation
    from lmatlas.model.generation import Generation
    from lmatlas.model.handle import Model

DIFFERENT = "bold black on yellow"  # style of the tokens where the two continuations differ


def plain_continuation(model: "Model", prompt: str, max_new_tokens: int, chat: bool) -> "Continuation":
    """Greedy continuation of ``prompt`` and each new token's log-probability (one teacher-forced forward)."""
    import torch

    from lmatlas.model.comparison import Continuation
    from lmatlas.model.generation import generate, prompt_ids, stop_reason

    batch = prompt_ids(model, prompt, chat)
    new = generate(model, prompt, max_new_tokens, chat=chat).token_ids
    logprobs: list[float] = []
    if new:
        n = batch["input_ids"].shape[1]
        ids = torch.cat([batch["input_ids"][0], torch.tensor(new, device=model.device)])[None]
        with torch.no_grad():
            logits = model.forward(ids)[0, n - 1 : n - 1 + len(new)].float()
        logprobs = torch.log_softmax(logits, -1)[torch.arange(len(new)), torch.tensor(new)].tolist()
    special = set(model.tokenizer.all_special_ids or ())
    return Continuation(
        text=model.tokenizer.decode([i for i in new if i not in special], skip_special_tokens=True),
        ids=new,
        tokens=model.tokenizer.convert_ids_to_tokens(new),
        logprob_plain=logprobs,
        stopped_by=stop_reason(model, new, max_new_tokens),
    )


def _visible(piece: str) -> str:
    """Control characters as escapes (a generated form feed must not clear the terminal)."""
    return "".join(ch if ch.isprintable() or ch == "\n" else ch.encode("unicode_escape").decode() for ch in piece)


def _pieces(model: "Model", ids: list[int]) -> list[str]:
    return [model.tokenizer.decode([i]) for i in ids]


def _highlighted(pieces: list[str], differs: list[bool]) -> Text:
    text = Text()
    for piece, different in zip(pieces, differs):
        text.append(_visible(piece), style=DIFFERENT if different else "")
    return text


def _why_empty(continuation: "Continuation") -> Text:
    reason = continuation.stopped_by or "only special tokens were generated"
    return Text(f"(empty: {reason})", style="italic red")


def show_plain(model: "Model", prompt: str, c: "Continuation", chat: bool) -> None:
    out.print(Text(f"Continuation of {title(prompt)}{' (chat template)' if chat else ''}", style="bold"))
    table = Table(show_header=False, expand=True)
    table.add_column("text", overflow="fold")
    table.add_row(Text(_visible(c.text)) if c.text else _why_empty(c))
    out.print(table)
    out.print(Text("Tokens and their log-probabilities", style="bold"))
    tokens = Table()
    for column in ("#", "token", "log p"):
        tokens.add_column(column, justify="left" if column == "token" else "right")
    for i, (piece, lp) in enumerate(zip(_pieces(model, c.ids), c.logprob_plain)):
        tokens.add_row(str(i), Text(repr(piece)), f"{lp:.3f}")
    out.print(tokens)
    if c.stopped_by and c.text:
        out.print(Text(f"stopped: {c.stopped_by}", style="italic"))


def show_comparison(model: "Model", comparison: "Comparison", chat: bool) -> None:
    """Both continuations side by side (differences highlighted), the first difference, per-token log-probs."""
    plain, edited = comparison.plain, comparison.edited
    n = max(len(plain.ids), len(edited.ids))
    differs = [i >= len(plain.ids) or i >= len(edited.ids) or plain.ids[i] != edited.ids[i] for i in range(n)]
    pp, ep = _pieces(model, plain.ids), _pieces(model, edited.ids)
    out.print(Text(f"Continuations of {title(comparison.prompt)}{' (chat template)' if chat else ''}", style="bold"))
    out.print(Text(f"edit: {' | '.join(comparison.edit)}"))
    if comparison.strategy != "greedy" or comparison.kv.get("method") != "default":
        out.print(Text(f"both with strategy {comparison.strategy}, KV cache {comparison.kv.get('method')}"))
    side = Table(expand=True)
    side.add_column("unedited", overflow="fold", ratio=1)
    side.add_column("edited", overflow="fold", ratio=1)
    side.add_row(
        _highlighted(pp, differs) if plain.text else _why_empty(plain),
        _highlighted(ep, differs) if edited.text else _why_empty(edited),
    )
    out.print(side)
    first = comparison.first_difference()
    if first is None:
        out.print(Text("The two continuations are identical.", style="bold"))
    else:
        a = repr(pp[first]) if first < len(pp) else "(end)"
        b = repr(ep[first]) if first < len(ep) else "(end)"
        out.print(Text(f"First difference at token {first}: unedited {a}, edited {b}.", style="bold"))
    out.print(Text("Each token's log-probability under the unedited (plain) and the edited model", style="bold"))
    tokens = Table()
    for column in ("#", "unedited token", "plain", "edited", "edited token", "plain ", "edited "):
        tokens.add_column(column, justify="left" if "token" in column else "right")
    for i in range(n):
        style = DIFFERENT if differs[i] else ""
        left = (
            (Text(repr(pp[i]), style=style), f"{plain.logprob_plain[i]:.3f}", f"{plain.logprob_edited[i]:.3f}")
            if i < len(pp)
            else ("", "", "")
        )
        right = (
            (Text(repr(ep[i]), style=style), f"{edited.logprob_plain[i]:.3f}", f"{edited.logprob_edited[i]:.3f}")
            if i < len(ep)
            else ("", "", "")
        )
        tokens.add_row(str(i), *left, *right)
    out.print(tokens)
    for name, c in (("unedited", plain), ("edited", edited)):
        if c.stopped_by and c.text:
            out.print(Text(f"{name} stopped: {c.stopped_by}", style="italic"))


def title(prompt: str, limit: int = 80) -> str:
    """A prompt as a title: quoted, cut to ``limit`` characters with its length when longer."""
    if len(prompt) <= limit:
        return repr(prompt)
    return f"{prompt[:limit]!r}... ({len(prompt):,} characters)"


def show_generation(model: "Model", prompt: str, result: "Generation", chat: bool) -> None:
    """The text, then what ran (strategy, KV cache, its report) as a table, all on stdout."""
    out.print(
        result.text if result.text else f"(empty: {result.stopped_by or 'only special tokens'})",
        highlight=False,
        soft_wrap=True,
    )
    summary: dict[str, Any] = {
        "prompt": title(prompt, 40),
        "strategy": result.strategy,
        "KV cache": result.kv.get("method"),
        "KV bytes held": result.kv.get("bytes"),
        "new tokens": len(result.token_ids),
        "seconds": round(result.seconds, 2),
        "tokens/s": round(result.tokens_per_s, 2),
    }
    for key, value in result.report.items():
        if isinstance(value, list) and len(value) > 8:
            value = f"{len(value)} values, first {value[:8]}"
        summary[key.replace("_", " ")] = round(value, 3) if isinstance(value, float) else value
    out.print(key_value_table("generation", {k: v for k, v in summary.items() if v is not None}))
