"""The circuit page's data: a built-in task's circuit as nodes placed by layer and scored edges.

Where it comes from, in order (``source="auto"``):

1. the atlas's ``circuits`` table (written by ``lmatlas circuit --task T --atlas FILE``,
   :func:`lmatlas.atlas.causal_results.save_circuit`): the circuit's edges, its faithfulness, CPR,
   CMD and verification, no model needed (the faithfulness curve is not stored);
2. the live model: :func:`lmatlas.causal.faithfulness.task_circuit` (what ``lmatlas
   circuit`` runs) on a few prompt pairs, with the faithfulness curve and the graph's
   next-best edges, remembered per app (:class:`~lmatlas.web.state.Memo`).

Every view names its ``granularity``: ``edges`` (each edge patched, MIB's run, the
default) or ``nodes`` (the heads and MLPs the edges touch run whole; what every circuit
stored before granularity was recorded is), and carries the ``verification`` of the
graph's top edges by exact edge patching (Spearman, largest error) when it has one.

The view (:func:`view`): ``edges`` ranked by ``|score|``, the first ``circuit_edges`` of
them the circuit; ``nodes`` every writer and reader they touch, with its layer (``embed``
is -1, ``logits`` is the number of layers). An edge into a head's queries is drawn to the
head (``L5.H3.q -> L5.H3``); into a KV group's keys or values, to the group (``L5.KV1``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field, StringConstraints

from lmatlas.causal.diagram import input_node
from lmatlas.causal.faithfulness import nodes_in
from lmatlas.causal.tasks import TASKS

if TYPE_CHECKING:
    from lmatlas.causal.faithfulness import Circuit
    from lmatlas.model.arch import HeadLayout
    from lmatlas.model.handle import Model

TaskName = Literal[TASKS]
NodeKind = Literal["embed", "head", "kv", "mlp", "feature", "error", "logits"]
FEATURE_NODE = re.compile(r"^L(?P<layer>\d+)\.(?P<site>[a-z_.]+?)\.(?:F(?P<index>\d+)|E)$")


class CircuitNode(BaseModel):
    name: str
    kind: NodeKind
    layer: int = Field(description="-1 for embed, the number of layers for logits")
    index: Optional[int] = Field(description="the head or KV group index, a feature's latent index, else null")
    site: Optional[str] = Field(None, description="a feature or error node's dictionary site, e.g. L15.resid.post")
    summary: Optional[str] = Field(None, description="a feature's decoded tokens and density (atlas features table)")
    in_circuit: bool


class CircuitEdge(BaseModel):
    source: str = Field(description="the writer: embed, L5.H3, L5.mlp, a feature L5.resid.post.F12 or error node")
    target: str = Field(
        description="the input read: L5.H3.q, L5.KV1.k, L5.KV1.v, L5.mlp, a feature or error node, or logits"
    )
    node: str = Field(description="the node the target belongs to (L5.H3, L5.KV1, L5.mlp, a feature, logits)")
    score: float = Field(description="the edge's attribution score (its effect on the task's logit difference)")
    in_circuit: bool


class CurvePoint(BaseModel):
    fraction: float
    edges: int
    nodes: int
    faithfulness: Optional[float]


Granularity = Literal["edges", "nodes"]
METHOD_PATTERN = r"^eap(-ig(-act)?)?(\+(qk|features|exact\d+))*$"
MethodName = Annotated[str, StringConstraints(pattern=METHOD_PATTERN, max_length=64)]


class FeatureSite(BaseModel):
    site: str = Field(description="the dictionary's site, e.g. L15.resid.post (an SAE) or L15.mlp (a transcoder)")
    latents: list[int] = Field(description="its latents that are nodes of the graph")
    error: str = Field(description="its error node: what the listed latents leave unexplained")


class Verification(BaseModel):
    edges: Optional[int] = Field(description="how many top edges were re-measured by exact edge patching")
    spearman: Optional[float] = Field(description="rank correlation of scores with exact effects")
    max_abs_error: Optional[float] = Field(description="largest |score - exact effect|")
    gap: Optional[float] = Field(description="clean - corrupt metric, for scale")


class CircuitView(BaseModel):
    task: str
    method: str = Field(
        description="eap, eap-ig (inputs) or eap-ig-act (activations); +qk: query and key edges scored QK-aware; "
        "+features: dictionary latents are nodes"
    )
    features: list[FeatureSite] = Field(
        default_factory=list, description="dictionaries whose latents are nodes (empty: heads and MLPs only)"
    )
    granularity: Granularity = Field(description="edges: each edge patched (MIB); nodes: touched nodes run whole")
    verification: Optional[Verification] = Field(description="top edges re-measured exactly (null if not stored)")
    computed: Literal["atlas", "live"]
    layers: int
    faithfulness: Optional[float] = Field(description="fraction of the clean - corrupt gap the circuit keeps")
    cpr: Optional[float] = Field(description="area under the faithfulness curve (live, or stored with it)")
    cmd: Optional[float] = Field(description="area under |1 - faithfulness| (live, or stored with it)")
    clean: Optional[float] = Field(description="the task metric on clean prompts (live only)")
    corrupt: Optional[float] = Field(description="... on corrupt prompts (live only)")
    circuit_edges: int = Field(description="how many of `edges`, from the first, form the circuit")
    circuit_nodes: list[str] = Field(description="heads and MLPs of the circuit (a KV edge brings its query heads)")
    edges: list[CircuitEdge] = Field(description="by decreasing |score|")
    nodes: list[CircuitNode]
    curve: list[CurvePoint] = Field(description="faithfulness by edges kept (empty when read from the atlas)")
    params: dict[str, Any] = Field(description="how it was computed: prompt pairs, seed, steps, target")


class StoredCircuit(BaseModel):
    task: str
    method: str
    granularity: Granularity
    edges: int
    faithfulness: Optional[float]


class CircuitTasks(BaseModel):
    tasks: list[str] = Field(description="the built-in tasks")
    stored: list[StoredCircuit] = Field(description="circuits the atlas holds")
    live: bool = Field(description="whether a model is attached to compute circuits")


def node_info(name: str, n_layers: int) -> dict[str, Any]:
    """``"L5.H3" -> {"kind": "head", "layer": 5, "index": 3}`` (and embed, logits, L5.KV1, L5.mlp, a feature
    ``L5.resid.post.F12`` -> kind ``feature``, index 12, site ``L5.resid.post``; its error node ``L5.resid.post.E``)."""
    if name == "embed":
        return {"name": name, "kind": "embed", "layer": -1, "index": None}
    if name == "logits":
        return {"name": name, "kind": "logits", "layer": n_layers, "index": None}
    feature = FEATURE_NODE.match(name)
    if feature:
        index = feature["index"]
        return {
            "name": name,
            "kind": "error" if index is None else "feature",
            "layer": int(feature["layer"]),
            "index": None if index is None else int(index),
            "site": f"L{feature['layer']}.{feature['site']}",
        }
    layer, part = name.split(".", 1)
    if part == "mlp":
        return {"name": name, "kind": "mlp", "layer": int(layer[1:]), "index": None}
    kind = "kv" if part.startswith("KV") else "head"
    return {"name": name, "kind": kind, "layer": int(layer[1:]), "index": int(part[2 if kind == "kv" else 1 :])}


def view(ranked: list[tuple[str, str, float]], in_circuit: int, layout: "HeadLayout", **meta: Any) -> dict[str, Any]:
    """The page's graph: ``ranked`` edges (the first ``in_circuit`` are the circuit) and their nodes."""
    edges = [
        {"source": s, "target": t, "node": input_node(t), "score": v, "in_circuit": i < in_circuit}
        for i, (s, t, v) in enumerate(ranked)
    ]
    kept = {e["source"] for e in edges if e["in_circuit"]} | {e["node"] for e in edges if e["in_circuit"]}
    names = {e["source"] for e in edges} | {e["node"] for e in edges}
    order = {"embed": 0, "head": 1, "kv": 2, "mlp": 3, "feature": 4, "error": 5, "logits": 6}
    nodes = sorted(
        (dict(node_info(n, layout.n_layers), in_circuit=n in kept) for n in names),
        key=lambda n: (n["layer"], order[n["kind"]], n.get("site") or "", n["index"] or 0),
    )
    return {
        "layers": layout.n_layers,
        "circuit_edges": in_circuit,
        "circuit_nodes": sorted(nodes_in(layout, ranked[:in_circuit])),
        "edges": edges,
        "nodes": nodes,
        "features": feature_sites(names),
        **meta,
    }


def feature_sites(names) -> list[dict[str, Any]]:
    """``[{site, latents, error}]``: the dictionaries whose latents or error node are among ``names``."""
    sites: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        info = node_info(name, 0)
        if info["kind"] in ("feature", "error"):
            site = sites.setdefault(info["site"], {"site": info["site"], "latents": [], "error": f"{info['site']}.E"})
            site["latents"] += [] if info["index"] is None else [info["index"]]
    return [dict(site, latents=sorted(site["latents"])) for site in sites.values()]


def feature_names(found: dict[str, Any]) -> list[str]:
    """The feature nodes of a view (what :func:`summarize` looks up in the atlas's ``features`` table)."""
    return [n["name"] for n in found["nodes"] if n["kind"] == "feature"]


def summarize(found: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Put each feature node's decoded tokens and density on it (``rows``: name, promoted, density of the
    atlas's ``features`` table, which the node names join by ``features.name``)."""
    by_name = {r["name"]: r for r in rows}
    for node in found["nodes"]:
        row = by_name.get(node["name"])
        if row is not None:
            tokens = ", ".join(repr(t) for t in (row["promoted"] or [])[:5])
            node["summary"] = f"writes {tokens}; active on {100 * (row['density'] or 0):.2g}% of corpus tokens"
    return found


def stored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{task, method, granularity, edges, faithfulness}]`` from ``SELECT task, method, count(*), ...`` rows
    (no granularity recorded: ``nodes``, how every circuit was run before it was)."""
    return [
        {
            "task": r["task"],
            "method": r["method"],
            "granularity": r.get("granularity") or "nodes",
            "edges": r["edges"],
            "faithfulness": r["faithfulness"],
        }
        for r in rows
    ]


def verification(check: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The page's summary of a circuit's verification (``None`` when it has none)."""
    if not check or not check.get("exact"):
        return None
    return {
        "edges": len(check["exact"]),
        "spearman": check.get("spearman"),
        "max_abs_error": check.get("max_abs_error"),
        "gap": check.get("gap"),
    }


def from_rows(task: str, method: str, rows: list[dict[str, Any]], layout: "HeadLayout") -> dict[str, Any]:
    """The view of a circuit read from the atlas (``rows``: source, target, score, faithfulness, and
    granularity, cpr, cmd, verified_* where the atlas records them)."""
    ranked = [(r["source"], r["target"], r["score"]) for r in rows]
    first = rows[0]
    check = None
    if first.get("verified_spearman") is not None or first.get("verified_max_error") is not None:
        check = {
            "edges": None,
            "spearman": first.get("verified_spearman"),
            "max_abs_error": first.get("verified_max_error"),
            "gap": None,
        }
    return view(
        ranked,
        len(ranked),
        layout,
        task=task,
        method=method,
        computed="atlas",
        granularity=first.get("granularity") or "nodes",
        verification=check,
        faithfulness=first["faithfulness"],
        cpr=first.get("cpr"),
        cmd=first.get("cmd"),
        clean=None,
        corrupt=None,
        curve=[],
        params={},
    )


def compute(
    model: "Model",
    task: str,
    *,
    n: int,
    seed: int,
    steps: int,
    target: float,
    granularity: str = "edges",
    verify: int = 50,
    along: str = "inputs",
    qk: bool = True,
) -> "Circuit":
    """The task's circuit on the live model (run it through the app's model gate)."""
    from lmatlas.causal.faithfulness import task_circuit

    return task_circuit(
        model,
        task,
        n=n,
        seed=seed,
        steps=steps,
        target=target,
        granularity=granularity,
        verify=verify,
        along=along,
        qk=qk,
    )


def from_circuit(circuit: "Circuit", layout: "HeadLayout", top: int, params: dict[str, Any]) -> dict[str, Any]:
    """The view of a live circuit: its edges, then the graph's next-best up to ``top`` edges in all."""
    graph = circuit.graph
    ranked = graph.edges(max(top, len(circuit.edges)))  # the circuit is its first len(circuit.edges)
    return view(
        ranked,
        len(circuit.edges),
        layout,
        task=graph.task,
        method=graph.method,
        computed="live",
        granularity=circuit.granularity,
        verification=verification(circuit.verification),
        faithfulness=circuit.faithfulness,
        cpr=circuit.cpr,
        cmd=circuit.cmd,
        clean=graph.clean,
        corrupt=graph.corrupt,
        curve=circuit.curve,
        params={**params, "prompts": graph.meta.get("prompts")},
        **({"features": graph.meta["features"]} if graph.meta.get("features") else {}),
    )


# -- attention explained (the circuit page's head panel) ------------------------------------------------------
class AttentionRequest(BaseModel):
    head: str = Field(description="the head, e.g. L5.H3")
    prompt: str = Field(
        min_length=1,
        max_length=40_000,
        json_schema_extra={"pattern": r"\S"},
        description="the text the head reads (capped at the lens's token limit: see /api/live)",
    )
    query_pos: int = Field(-1, ge=-100_000, le=100_000, description="the query token (negative: from the end)")
    key_pos: Optional[int] = Field(
        None, ge=-100_000, le=100_000, description="the key token (default: where the head attends most)"
    )


class SourcePart(BaseModel):
    source: str = Field(description="embed, L5.H3 or L5.mlp")
    value: float = Field(description="its contribution to the score (query, key side) or share of the write (value)")


class AttentionSourcesView(BaseModel):
    head: str
    kv_group: int
    query_pos: int
    key_pos: int
    tokens: list[str]
    score: float = Field(description="the head's attention logit on (query, key), before softmax")
    probability: float
    pattern: list[float] = Field(description="the head's attention from the query over keys 0..query")
    scores: list[float] = Field(description="its logits over keys 0..query (before any softcap or window)")
    query_side: list[SourcePart] = Field(description="largest |contribution| first")
    key_side: list[SourcePart]
    value_side: list[SourcePart]
    rest: dict[str, float] = Field(description="biases and exact remainders of each side")


def sources_view(found: Any, top: int = 12) -> dict[str, Any]:
    """The panel's view of :class:`~lmatlas.causal.attention_sources.AttentionSources` (``top`` per side)."""
    sides = {
        f"{side}_side": [{"source": s, "value": v} for s, v in found.top(side, top)]
        for side in ("query", "key", "value")
    }
    return {
        "head": found.head,
        "kv_group": found.kv_group,
        "query_pos": found.query_pos,
        "key_pos": found.key_pos,
        "tokens": found.tokens,
        "score": found.score,
        "probability": found.probability,
        "pattern": found.pattern,
        "scores": found.scores,
        "rest": found.rest,
        **sides,
    }
