"""Causal commands: ``patch`` (exact activation patching) and ``attribute`` (AtP*, verified).

    lmatlas patch [MODEL] --task ioi [--targets heads] [--n 8] [--top 20] [--json]
    lmatlas attribute [MODEL] --task ioi [--targets heads] [--no-qk-fix] [--grad-drop] [--verify 10] [--json]
    lmatlas circuit [MODEL] --task ioi [--ig-steps 0] [--ig-along inputs|activations] [--no-qk]
                    [--granularity edges|nodes] [--verify 50] [--features DIR ...] [--latents 32] [--json]
    lmatlas explain-attention MODEL L5.H3 --prompt TEXT [--query-pos -1] [--key-pos N] [--top 8] [--json]

``--task`` is ioi, capitals, induction, greater-than or a .jsonl file of
``{"clean", "corrupt", "answer", "wrong"}`` rows. ``--targets`` is a comma list of
target names (``L5.H3``, ``L5.H3.q``, ``L5.KV1.k``, ``L3.resid.post``, ``L3.N5``) or a
family: ``heads``, ``heads.q``, ``kv.k``, ``kv.v``, ``resid.post``, ``mlp.out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, MODEL_ARG, app, load_model, out, print_json, run

TASK_OPT = typer.Option(..., "--task", "-t", help="ioi, capitals, induction, greater-than, or FILE.jsonl.")
TARGETS_OPT = typer.Option("heads", "--targets", help="Comma list of targets or a family (heads, heads.q, kv.k, ...).")
N_OPT = typer.Option(8, "--n", help="Prompt pairs generated for a built-in task.")
TOP_OPT = typer.Option(20, "--top", help="Rows shown (--json has all).")
ATLAS_OPT = typer.Option(None, "--atlas", help="Also keep the result in this atlas (tables effects / circuits).")


def _targets(spec: str, layout) -> list[str]:
    from lmatlas.causal.targets import expand

    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in ("heads", "heads.q", "kv.k", "kv.v") or "." in part and not part.startswith("L"):
            names.extend(expand(part, layout))
        else:
            names.append(part)
    return names


def _task_and_targets(model: Optional[str], dtype: str, device: Optional[str], task: str, n: int, targets: str):
    """``(model, task batch, target names)`` of a ``patch`` / ``attribute`` command, loaded in that order."""
    from lmatlas.causal import load_task

    loaded = load_model(model, dtype, device)
    return loaded, load_task(loaded, task, n=n), _targets(targets, loaded.layout)


def _keep(atlas: Optional[str], model, effects) -> None:
    if atlas:
        from lmatlas.atlas.causal_results import save_effects

        save_effects(atlas, model, effects)


def _show(effects, top: int, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("target", "metric after patch", "effect", "fraction of gap"):
        table.add_column(column, justify="right" if column != "target" else "left")
    rows = {r["target"]: r for r in effects.rows()}
    for name in effects.top(top):
        r = rows[name]
        table.add_row(name, f"{r['value']:.3f}", f"{r['effect']:+.3f}", f"{r['normalized']:+.2f}")
    out.print(table)
    out.print(f"clean {effects.metric} {effects.clean:.3f}, corrupt {effects.corrupt:.3f}")


@app.command("patch")
def patch_command(
    model: Optional[str] = MODEL_ARG,
    task: str = TASK_OPT,
    targets: str = TARGETS_OPT,
    n: int = N_OPT,
    top: int = TOP_OPT,
    atlas: Optional[str] = ATLAS_OPT,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Exact activation patching: the corrupt prompts with each target taken from the clean run."""
    from lmatlas.causal import patch

    def body():
        loaded, batch, names = _task_and_targets(model, dtype, device, task, n, targets)
        effects = patch(loaded, batch, names)
        _keep(atlas, loaded, effects)
        if as_json:
            print_json(effects.to_dict())
        else:
            _show(effects, top, f"Activation patching, task {batch.name} ({len(batch)} pairs, {len(names)} targets)")

    run(body)


@app.command("attribute")
def attribute_command(
    model: Optional[str] = MODEL_ARG,
    task: str = TASK_OPT,
    targets: str = TARGETS_OPT,
    n: int = N_OPT,
    qk_fix: bool = typer.Option(True, "--qk-fix/--no-qk-fix", help="Recompute patterns exactly for q/k targets."),
    grad_drop: bool = typer.Option(
        False, "--grad-drop", help="Also report GradDrop magnitudes (one backward per layer)."
    ),
    verify: int = typer.Option(10, "--verify", help="Re-measure this many top targets with exact patching."),
    top: int = TOP_OPT,
    atlas: Optional[str] = ATLAS_OPT,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Attribution patching (AtP*): every target at once, the top ones verified by exact patching."""
    from lmatlas.causal import attribute

    def body():
        loaded, batch, names = _task_and_targets(model, dtype, device, task, n, targets)
        effects = attribute(loaded, batch, names, qk_fix=qk_fix, grad_drop=grad_drop, verify=verify)
        _keep(atlas, loaded, effects)
        if as_json:
            data = effects.to_dict()
            if "grad_drop" in effects.extra:
                data["grad_drop"] = dict(zip(effects.targets, effects.extra["grad_drop"].tolist()))
            print_json(data)
            return
        _show(effects, top, f"Attribution patching ({effects.method}), task {batch.name}")
        check = effects.verification
        if check:
            out.print(
                f"verified top {len(check['targets'])} by exact patching: Spearman {check['spearman']:.2f}, "
                f"largest error {check['max_abs_error']:.3f} (gap {check['gap']:.3f})"
            )

    run(body)


@app.command("circuit")
def circuit_command(
    model: Optional[str] = MODEL_ARG,
    task: str = TASK_OPT,
    n: int = N_OPT,
    steps: int = typer.Option(0, "--ig-steps", help="EAP-IG interpolation steps (0 = plain EAP)."),
    along: str = typer.Option(
        "inputs",
        "--ig-along",
        help="EAP-IG path: inputs (embeddings) or activations "
        "(every layer's stream held on the corrupt-clean line, MIB's variant).",
    ),
    qk: bool = typer.Option(
        True,
        "--qk/--no-qk",
        help="Score query and key edges QK-aware (the head's softmax "
        "recomputed exactly) instead of by the softmax's gradient.",
    ),
    target: float = typer.Option(0.8, "--faithfulness", help="Keep the smallest circuit reaching this faithfulness."),
    picture: Optional[str] = typer.Option(None, "--svg", help="Write the circuit diagram (SVG) to this file."),
    granularity: str = typer.Option(
        "edges",
        "--granularity",
        help="edges: each edge patched (MIB's run); nodes: the heads and MLPs the edges touch run whole.",
    ),
    verify: int = typer.Option(50, "--verify", help="Top edges re-measured by exact edge patching (0 = none)."),
    features: Optional[list[Path]] = typer.Option(
        None,
        "--features",
        help="A dictionary folder (sparsify or SAELens layout) whose latents and error node become nodes "
        "(an SAE at L<n>.resid.post; a transcoder replaces its MLP); repeat for several.",
    ),
    latents: int = typer.Option(32, "--latents", help="With --features: the latents per dictionary that move most."),
    atlas: Optional[str] = ATLAS_OPT,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Edge attribution (EAP / EAP-IG) over heads (q, k, v inputs), MLPs and, with --features, dictionary
    latents, pruned to a faithful circuit (faithfulness measured edge by edge unless --granularity nodes),
    its top edges verified exactly."""
    from lmatlas.causal.diagram import circuit_svg
    from lmatlas.causal.faithfulness import check_granularity, task_circuit
    from lmatlas.errors import TaskError

    def body():
        if not 0 < target <= 1:
            raise TaskError(f"--faithfulness must be in (0, 1], got {target}.")
        if verify < 0:
            raise TaskError(f"--verify must be 0 or more, got {verify}.")
        check_granularity(granularity)
        if along not in ("inputs", "activations"):
            raise TaskError(f"--ig-along must be inputs or activations, got {along!r}.")
        dictionaries = _dictionaries(features, granularity, latents)  # bad files fail before the model loads
        loaded = load_model(model, dtype, device)
        how = dict(n=n, steps=steps, target=target, granularity=granularity, verify=verify, along=along, qk=qk)
        if dictionaries:
            from lmatlas.causal.edge_feature_circuit import attach_all, feature_task_circuit

            attach_all(loaded, dictionaries)
            circuit = feature_task_circuit(loaded, task, top_latents=latents, **how)
        else:
            circuit = task_circuit(loaded, task, **how)
        if picture:
            Path(picture).write_text(circuit_svg(circuit, loaded.layout.n_layers))
        if atlas:
            from lmatlas.atlas.causal_results import save_circuit

            save_circuit(atlas, loaded, circuit)
        if as_json:
            print_json({**circuit.to_dict(), "features": circuit.graph.meta.get("features"), "svg": picture})
        else:
            _print_circuit(circuit, picture)

    run(body)


def _dictionaries(folders: Optional[list[Path]], granularity: str, latents: int) -> list:
    """The dictionaries of ``--features`` folders, read and checked before the model loads."""
    if not folders:
        return []
    from lmatlas.errors import TaskError
    from lmatlas.features.files import load as load_dictionary

    if granularity != "edges":
        raise TaskError("A circuit with --features runs edge by edge only: leave out --granularity nodes.")
    if latents < 1:
        raise TaskError(f"--latents must be 1 or more, got {latents}.")
    return [load_dictionary(folder) for folder in folders]


def _print_circuit(circuit, picture: Optional[str]) -> None:
    """The circuit as a table, its faithfulness curve and its exact verification."""
    table = Table(
        title=f"Circuit for {circuit.graph.task} ({circuit.graph.method}, run as "
        f"{circuit.granularity}): {len(circuit.edges)} edges, faithfulness "
        f"{circuit.faithfulness:.2f}, CPR {circuit.cpr:.2f}, CMD {circuit.cmd:.2f}",
        title_justify="left",
    )
    for column in ("source", "target", "score"):
        table.add_column(column)
    for source, target_name, score in circuit.edges:
        table.add_row(source, target_name, f"{score:+.3f}")
    out.print(table)
    out.print(
        f"faithfulness ({circuit.granularity}) by edges kept: "
        + ", ".join(f"{c['edges']}: {c['faithfulness']:.2f}" for c in circuit.curve)
    )
    check = circuit.verification
    if check and check["exact"]:
        rho = "n/a" if check["spearman"] is None else f"{check['spearman']:.2f}"
        out.print(
            f"verified: top {len(check['exact'])} edges re-measured by exact edge patching, Spearman {rho}, "
            f"largest error {check['max_abs_error']:.3f} (gap {check['gap']:.3f})"
        )
        before = check.get("before_rescoring")
        if before and before["spearman"] is not None:
            out.print(
                f"  {check['reused']} of them were re-scored exactly before ranking (their scores are exact by "
                f"construction); {before['method']} alone: Spearman {before['spearman']:.2f} over its top "
                f"{before['k']}, largest error {before['max_abs_error']:.3f}"
            )
    for site in circuit.graph.meta.get("features") or []:
        out.print(
            f"feature nodes at {site['site']}: {len(site['latents'])} latents ({site['site']}.F<i>) and the "
            f"error node {site['error']} (what they leave unexplained)"
        )
    if picture:
        out.print(f"diagram: {picture}")


@app.command("explain-attention")
def explain_attention_command(
    model: Optional[str] = MODEL_ARG,
    head: str = typer.Argument(..., help="The head, e.g. L5.H3."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text the head reads."),
    query_pos: int = typer.Option(-1, "--query-pos", help="The query token (negative counts from the end)."),
    key_pos: Optional[int] = typer.Option(None, "--key-pos", help="The key token (default: where it attends most)."),
    top: int = typer.Option(8, "--top", help="Sources shown per side (--json has all)."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Why a head attends where it does: its score on a (query, key) pair split over the upstream heads and
    MLPs on the query side and on the key side, and which writes it moves (value side)."""
    from lmatlas.causal.attention_sources import attention_sources

    def body():
        loaded = load_model(model, dtype, device)
        found = attention_sources(loaded, head, prompt, query_pos=query_pos, key_pos=key_pos)
        if as_json:
            print_json(found.to_dict())
            return
        q, k = found.tokens[found.query_pos], found.tokens[found.key_pos]
        out.print(
            f"{found.head} (KV group {found.kv_group}) at query {found.query_pos} {q!r} on key "
            f"{found.key_pos} {k!r}: score {found.score:+.3f}, attention {found.probability:.3f}"
        )
        for side, what in (("query", "contribution"), ("key", "contribution"), ("value", "share of the write")):
            table = Table(title=f"{side} side", title_justify="left")
            table.add_column("source")
            table.add_column(what)
            for source, value in found.top(side, top):
                table.add_row(source, f"{value:+.3f}")
            out.print(table)
        out.print("rest: " + ", ".join(f"{name} {value:+.4f}" for name, value in found.rest.items()))

    run(body)
