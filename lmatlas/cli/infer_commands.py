"""Inference commands: ``generate`` with a head-wise KV cache, ``prune`` heads by importance.

    lmatlas generate "prompt"                                   default cache
    lmatlas generate [MODEL] "prompt" --kv-budget 0.25 --atlas smollm2.atlas.duckdb
    lmatlas generate "prompt" --kv-budget 0 --sink 4 --recent 128        sinks + window everywhere
    lmatlas generate "prompt" --kv-budget 0.25 --random-seed 1          random full heads (a baseline)
    lmatlas generate "prompt" --kv-snap 512                             SnapKV: 512 prompt entries per KV head
    lmatlas generate "prompt" --kv hybrid --kv-budget 0.25 --atlas A --kv-snap 256     any registered policy
    lmatlas prune [MODEL] --fraction 0.2 --atlas smollm2.atlas.duckdb [--random-seed N] [--json]

``--kv-budget F`` keeps the fraction ``F`` of the KV heads of full-attention layers
whole; the others keep ``--sink`` + ``--recent`` entries (see :mod:`lmatlas.infer.plan`).
``--kv-snap N`` evicts by score instead (SnapKV, :mod:`lmatlas.infer.snap`): each KV
head keeps the ``N`` prompt entries the prompt's end attends to most.
The result shows the text and what the cache held (bytes of storage), prefill and
decode times and the peak memory each added.

``--kv NAME`` names any policy of the registry (:mod:`lmatlas.infer.policies`; the help
lists them); without it the option given implies one.

Each group of options turns into a value (:class:`KVOptions` -> a KV policy) that the
``generate`` command (:mod:`lmatlas.cli.generate_commands`) composes with an edit and a
decoding strategy in one :func:`lmatlas.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, app, err, key_value_table, load_model, out, print_json, run
from lmatlas.errors import LmatlasError
from lmatlas.infer.policies import KV_POLICIES, check_inputs, get_policy, implied_policy

KV_BUDGET_OPT = typer.Option(
    None, "--kv-budget", help="Fraction of KV heads kept full (0-1); omit for the default cache."
)
ATLAS_OPT = typer.Option(None, "--atlas", help="The model's atlas: census scores choose the full heads.")
SINK_OPT = typer.Option(4, "--sink", help="Entries kept at the start of the context by windowed heads.")
RECENT_OPT = typer.Option(
    256, "--recent", help="Most recent tokens a windowed head sees, its own included (lmatlas.model.window.Window)."
)
KV_SNAP_OPT = typer.Option(
    None, "--kv-snap", help="SnapKV: prompt entries each KV head keeps (> 32); omit for no eviction."
)
KV_GATES_OPT = typer.Option(None, "--kv-gates", help="--kv gates: a JSON file of trained gates ({'gates': [[...]]}).")
RANDOM_OPT = typer.Option(None, "--random-seed", help="Choose the full heads at random with this seed (a baseline).")
KV_OPT = typer.Option(
    None,
    "--kv",
    help="KV cache policy: "
    + "; ".join(f"{kind.name} ({kind.options()})" for kind in KV_POLICIES.values())
    + ". Default: what --kv-budget / --kv-snap / --kv-gates imply.",
)


@dataclass(frozen=True)
class KVOptions:
    """The KV-cache options of one command line (checked by :meth:`check` before the model loads).

    ``kind`` names a policy of :data:`lmatlas.infer.policies.KV_POLICIES` (``None``: the one the
    given options imply); the others are its inputs.
    """

    budget: Optional[float] = None
    atlas: Optional[Path] = None
    sink: int = 4
    recent: int = 256
    random_seed: Optional[int] = None
    snap: Optional[int] = None
    kind: Optional[str] = None
    gates: Optional[Path] = None

    def given(self) -> set[str]:
        """The policy inputs given (``plan``, ``capacity``, ``gates``)."""
        values = {"plan": self.budget, "capacity": self.snap, "gates": self.gates}
        return {name for name, value in values.items() if value is not None}

    def name(self) -> str:
        """The policy's registered name."""
        return self.kind if self.kind is not None else implied_policy(self.given())

    def check(self) -> None:
        """Every KV option checked before the model loads."""
        from lmatlas.infer.choose import check_budget
        from lmatlas.infer.snap import SnapPlan
        from lmatlas.model.window import Window

        kind = check_inputs(self.name(), self.given())
        if self.snap is not None:
            SnapPlan(capacity=self.snap)
        if self.budget is not None:
            check_budget(self.budget)
        if "plan" in kind.inputs or "gates" in kind.inputs:
            Window(self.sink, self.recent)
        if self.atlas is not None and not self.atlas.is_file():
            raise LmatlasError(f"No atlas file at {self.atlas}: build one with `lmatlas map --out FILE.duckdb`.")
        if self.gates is not None and not self.gates.is_file():
            raise LmatlasError(f"No gates file at {self.gates}: save GateResult.gates as JSON ({{'gates': [[...]]}}).")

    def policy(self, model):
        """The KV policy value for ``model`` (``None``: the default cache)."""
        import json

        from lmatlas.infer.generate import resolve_plan
        from lmatlas.model.window import Window

        kind = get_policy(self.name())
        inputs = {"capacity": self.snap, "window": Window(self.sink, self.recent)}
        if "plan" in kind.inputs:
            inputs["plan"] = resolve_plan(model, self.budget, self.atlas, self.sink, self.recent, self.random_seed)
        if "gates" in kind.inputs:
            data = json.loads(self.gates.read_text(encoding="utf-8"))
            inputs["gates"] = data["gates"] if isinstance(data, dict) else data
        return kind.make(**inputs)


def show_kv_run(model, prompt: str, plan, max_new_tokens: int, as_json: bool) -> None:
    """Greedy generation with a KV policy, measured phase by phase: the text, bytes held, times, peaks."""
    from lmatlas.infer.generate import generate_kv

    with err.status("Generating..."):
        result = generate_kv(model, prompt, plan=plan, max_new_tokens=max_new_tokens)
    data = result.to_dict()
    if as_json:
        print_json(data)
        return
    out.print(result.text, highlight=False, soft_wrap=True)
    summary = {
        "cache": data["plan"].get("method", "default"),
        "full KV heads": (
            f"{data['plan']['full_kv_heads']} of {data['plan']['choosable_kv_heads']}"
            if "full_kv_heads" in data["plan"]
            else f"none: {data['plan']['capacity']} prompt entries each"
            if "capacity" in data["plan"]
            else "all"
        ),
        "KV bytes held": result.kv_bytes,
        "prompt tokens": result.prompt_tokens,
        "prefill s": round(result.prefill_s, 3),
        "decode tokens/s": round(result.decode_tokens_per_s, 2) if result.decode_tokens_per_s else None,
        "peak MB prefill / decode": "/".join(
            f"{b / 2**20:.1f}" if b is not None else "?" for b in (result.peak_prefill_bytes, result.peak_decode_bytes)
        ),
    }
    for note in data["plan"].get("notes", []):
        err.print(f"note: {note}", highlight=False)
    err.print(key_value_table("KV cache", summary))


@app.command()
def prune(
    model: Optional[str] = typer.Argument(None, help="Hub id, local directory, .gguf file or packaged name."),
    fraction: float = typer.Option(..., "--fraction", help="Fraction of query heads to remove (0-1)."),
    atlas: Optional[Path] = typer.Option(None, "--atlas", help="The model's atlas (head_importance)."),
    random_seed: Optional[int] = typer.Option(None, "--random-seed", help="Remove random heads instead."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text for perplexity (default: the essays)."),
    windows: int = typer.Option(4, "--windows", help="Windows of 256 tokens to measure perplexity on."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Remove the least important heads physically; report perplexity and parameters before and after."""
    import torch

    from lmatlas.infer import prune as pruning

    def body():
        if not 0.0 <= fraction <= 1.0:
            raise LmatlasError(f"--fraction must be in [0, 1], got {fraction}.")
        if atlas is None and random_seed is None:
            raise LmatlasError("Pass --atlas FILE (remove the least important heads) or --random-seed N.")
        if atlas is not None and not atlas.exists():
            raise LmatlasError(f"No atlas at {atlas}: build one with `lmatlas map --out {atlas}`.")
        if text is not None and not text.exists():
            raise LmatlasError(f"No text file at {text}.")
        loaded = load_model(model, dtype, device)
        if random_seed is not None:
            heads = pruning.random_heads(loaded, fraction, random_seed)
        else:
            heads = pruning.least_important(pruning.importance_from_atlas(loaded, atlas), fraction)
        if text is not None:
            ids = loaded.tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        else:
            from lmatlas.infer.needle import haystack_text

            ids = loaded.tokenizer(haystack_text()[:200_000], add_special_tokens=False)["input_ids"]
        if len(ids) < 256 * windows:
            raise LmatlasError(f"The text has {len(ids)} tokens; perplexity needs {256 * windows} (--windows).")
        step = len(ids) // windows
        batch = torch.tensor([ids[i * step : i * step + 256] for i in range(windows)], device=loaded.device)
        with err.status("Measuring, pruning, measuring..."):
            before = pruning.perplexity(loaded, batch)
            report = pruning.prune_heads(loaded, heads)
            after = pruning.perplexity(loaded, batch)
        data = {
            "heads_removed": report.removed_heads,
            "kv_heads_removed": report.removed_kv_heads,
            "ghost_heads": report.ghost_heads,
            "params_before": report.params_before,
            "params_after": report.params_after,
            "perplexity_before": round(before, 4),
            "perplexity_after": round(after, 4),
            "chosen_by": "random" if random_seed is not None else "importance",
            "heads": sorted(heads),
        }
        if as_json:
            print_json(data)
            return
        out.print(key_value_table("Pruned", {k: v for k, v in data.items() if k != "heads"}))

    run(body)
