"""Reading labels back: one unit's explanation, and a text search over label sentences and rules.

:func:`explain` joins what the atlas knows about a unit around its label rows (stage
``labels``): for a head, its census types (``head_scores`` with ``label``) and its OV
summary (``head_ov``); for a neuron, its weight-decoded promoted tokens (``neurons``)
when its output side was not checked by steering. The **sentence** is the label's own
(rule and scores) followed by those, so nothing in it is unmeasured:

    L1.H2 (head): attends to the token after an earlier copy of the current token (induction)
    (explains 95% of its attention [92%, 96%]; null 5%); census: induction; OV: copies (0.84)

:func:`find_labels` matches a text against label sentences and rule JSON (case-insensitive).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from lmatlas.errors import AtlasError, SiteError

if TYPE_CHECKING:
    from lmatlas.atlas.query import Atlas

UNIT_RE = re.compile(r"^L(?P<layer>\d+)\.(?P<kind>[HN])(?P<index>\d+)$")
FEATURE_RE = re.compile(r"^L(?P<layer>\d+)\.(?P<site>[a-z.]+)\.F(?P<index>\d+)$")


def check_unit(atlas: "Atlas", unit: str) -> tuple[str, int, int]:
    """``"L5.H3" -> ("head", 5, 3)``, checked against the atlas's model sizes (the valid range in the error).

    A feature (``"L15.resid.post.F123"``) gives ``("feature", 15, 123)``; its range is checked
    against the labels stored for its dictionary.
    """
    feature = FEATURE_RE.match(unit.strip())
    if feature:
        return "feature", int(feature["layer"]), int(feature["index"])
    match = UNIT_RE.match(unit.strip())
    if not match:
        raise SiteError(
            f"{unit!r} is not a unit name: expected L<layer>.H<head>, L<layer>.N<neuron> or a feature "
            "such as L15.resid.post.F123."
        )
    card = atlas.card
    layer, index = int(match["layer"]), int(match["index"])
    kind = "head" if match["kind"] == "H" else "neuron"
    layers = int(card.get("layers", 0))
    size = int(card.get("query_heads" if kind == "head" else "neurons_per_layer", 0))
    if not 0 <= layer < layers:
        raise SiteError(f"Layer {layer} is out of range: this model has layers 0..{layers - 1}.")
    if not 0 <= index < size:
        what = "heads" if kind == "head" else "neurons"
        raise SiteError(f"{unit}: this model has {what} 0..{size - 1} in each layer.")
    return kind, layer, index


def require_labels(atlas: "Atlas") -> None:
    """Refuse an atlas without the stage ``labels``, naming the command that adds it."""
    done = atlas.sql("SELECT count(*) AS n FROM runs WHERE stage = 'labels' AND status = 'done'").column("n")[0]
    if not done.as_py():
        raise AtlasError(
            f"{atlas.path} has no labels (an older atlas, or one built with --only). "
            f"Add them with: {atlas.map_command(['labels'])}"
        )


def _rows(atlas: "Atlas", unit: str) -> list[dict[str, Any]]:
    rows = atlas.sql("SELECT * FROM labels WHERE unit = ? ORDER BY side", [unit]).to_pylist()
    for row in rows:
        for key in ("rule", "scores", "nulls"):
            row[key] = json.loads(row[key]) if isinstance(row[key], str) else row[key]
    return rows


def _has_rows(atlas: "Atlas", table: str) -> bool:
    found = atlas.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [table])
    return bool(found.column("n")[0].as_py()) and atlas.count(table) > 0


def _head_context(atlas: "Atlas", layer: int, head: int) -> dict[str, Any]:
    out: dict[str, Any] = {"census": [], "ov": None}
    if _has_rows(atlas, "head_scores"):
        out["census"] = atlas.sql(
            "SELECT detector, score, baseline, z, label FROM head_scores WHERE layer = ? AND head = ? "
            "ORDER BY label DESC, z DESC",
            [layer, head],
        ).to_pylist()
    if _has_rows(atlas, "head_ov"):
        found = atlas.sql(
            "SELECT copying, suppression, top_sources[1:3] AS sources, top_outputs[1:3] AS outputs FROM head_ov "
            "WHERE layer = ? AND head = ?",
            [layer, head],
        ).to_pylist()
        out["ov"] = found[0] if found else None
    return out


def _head_extra(context: dict[str, Any]) -> str:
    parts = []
    types = [r["detector"] for r in context["census"] if r["label"]]
    parts.append("census: " + (", ".join(types) if types else "no type"))
    ov = context["ov"]
    if ov:
        if ov["copying"] >= 0.5:
            parts.append(f"OV: copies ({ov['copying']:.2f})")
        elif ov["suppression"] >= 0.5:
            parts.append(f"OV: suppresses ({ov['suppression']:.2f})")
        elif ov["sources"]:
            pairs = ", ".join(f"{json.dumps(s)}→{json.dumps(o)}" for s, o in zip(ov["sources"], ov["outputs"]))
            parts.append(f"OV: {pairs}")
    return "; ".join(parts)


def explain(atlas: "Atlas", unit: str) -> dict[str, Any]:
    """Everything the atlas says about ``unit`` (``"L5.H3"``, ``"L12.N1031"``), with one sentence."""
    kind, layer, index = check_unit(atlas, unit)
    require_labels(atlas)
    name = unit.strip() if kind == "feature" else f"L{layer}.{'H' if kind == 'head' else 'N'}{index}"
    rows = _rows(atlas, name)
    if not rows and kind == "feature":
        site = name.rsplit("F", 1)[0] + "F"
        n = atlas.sql("SELECT count(*) AS n FROM labels WHERE starts_with(unit, ?) AND kind = 'feature'", [site])
        count = n.column("n")[0].as_py()
        have = f"features {site}0..{site}{count - 1}" if count else f"no feature labels at {site}"
        raise SiteError(f"{name}: the atlas has {have} (build with --features and the stage labels).")
    if not rows:
        raise AtlasError(f"{atlas.path} has no label for {name}: resume the build with {atlas.map_command(['labels'])}")
    by_side = {r["side"]: r for r in rows}
    result: dict[str, Any] = {"unit": name, "kind": kind, "layer": layer, "index": index, "labels": rows}
    if kind == "feature":
        sentence = by_side["input"]["sentence"]
    elif kind == "head":
        context = _head_context(atlas, layer, index)
        result.update(context)
        sentence = f"{by_side['attention']['sentence']}; {_head_extra(context)}"
    else:
        sentence = by_side["input"]["sentence"]
        out = by_side.get("output")
        if out is not None and out["labelled"]:
            sentence += "; " + out["sentence"]
        elif _has_rows(atlas, "neurons"):
            found = atlas.sql("SELECT promoted[1:5] AS p FROM neurons WHERE layer = ? AND neuron = ?", [layer, index])
            promoted = found.column("p").to_pylist()
            if promoted and promoted[0]:
                checked = "steering did not verify" if out is not None else "by weights, not checked by steering"
                shown = ", ".join(json.dumps(t, ensure_ascii=False) for t in promoted[0][:3])
                sentence += f"; promotes {shown} ({checked})"
    result["labelled"] = any(r["labelled"] for r in rows)
    result["sentence"] = sentence
    return result


def find_labels(atlas: "Atlas", text: str, limit: int = 20, labelled_only: bool = True) -> list[dict[str, Any]]:
    """Label rows whose sentence or rule mentions ``text`` (case-insensitive), best score first."""
    if not _has_rows(atlas, "labels"):
        return []
    return atlas.sql(
        "SELECT unit, kind, layer, idx AS index, side, labelled, sentence, score FROM labels "
        "WHERE (contains(lower(sentence), lower(?)) OR contains(lower(CAST(rule AS VARCHAR)), lower(?))) "
        "AND (labelled OR NOT ?) ORDER BY labelled DESC, score DESC NULLS LAST LIMIT ?",
        [text, text, labelled_only, int(limit)],
    ).to_pylist()
