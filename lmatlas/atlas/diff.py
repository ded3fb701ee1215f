"""Diff two atlases of one architecture (base vs. instruct, two quantisations).

* per head and detector: the score change and label flips;
* neurons: the fraction whose top promoted token is unchanged (the neuron-decoding
  paper reports over 75% for Llama-3.1-8B base vs. instruct) and the neurons whose
  top-k promoted tokens changed most (lowest overlap);
* importance: the heads whose mean-ablation loss changed most.

Both files must describe the same architecture (family, layers, heads, KV heads,
neurons, vocabulary); anything else is refused with the differences listed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmatlas.atlas.query import Atlas
from lmatlas.errors import AtlasError

SAME_ARCHITECTURE = ("family", "layers", "query_heads", "kv_heads", "neurons_per_layer", "vocab")


@dataclass
class AtlasDiff:
    a: str
    b: str
    heads_compared: int = 0
    label_flips: list[dict[str, Any]] = field(default_factory=list)
    most_changed_heads: list[dict[str, Any]] = field(default_factory=list)
    neurons_compared: int = 0
    top_token_unchanged: float | None = None
    most_changed_neurons: list[dict[str, Any]] = field(default_factory=list)
    importance_changes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_comparable(a: Atlas, b: Atlas) -> None:
    card_a, card_b = a.card, b.card
    mismatch = {k: (card_a.get(k), card_b.get(k)) for k in SAME_ARCHITECTURE if card_a.get(k) != card_b.get(k)}
    if mismatch:
        raise AtlasError(
            f"{a.path} and {b.path} are atlases of different architectures ({mismatch}); "
            "diff compares two checkpoints of one architecture."
        )


def diff_atlases(path_a: str | Path, path_b: str | Path, top: int = 10) -> AtlasDiff:
    """Compare atlas ``b`` against atlas ``a``."""
    with Atlas.open(path_a) as a, Atlas.open(path_b) as b:
        _check_comparable(a, b)
        con = a.store.con
        con.execute(f"ATTACH '{Path(path_b).resolve()}' AS other (READ_ONLY)")
        try:
            return _diff(a, Path(path_a), Path(path_b), top)
        finally:
            con.execute("DETACH other")


def _diff(a: Atlas, path_a: Path, path_b: Path, top: int) -> AtlasDiff:
    report = AtlasDiff(str(path_a), str(path_b))
    heads = "FROM head_scores x JOIN other.head_scores y USING (layer, head, detector)"
    report.heads_compared = int(a.sql(f"SELECT count(DISTINCT (layer, head)) AS n {heads}").column("n")[0].as_py())
    report.label_flips = a.sql(
        f"SELECT 'L' || layer || '.H' || head AS head, detector, x.label AS label_a, y.label AS label_b, "
        f"x.score AS score_a, y.score AS score_b {heads} WHERE x.label <> y.label "
        "ORDER BY abs(y.score - x.score) DESC").to_pylist()
    report.most_changed_heads = a.sql(
        f"SELECT 'L' || layer || '.H' || head AS head, detector, x.score AS score_a, y.score AS score_b, "
        f"y.score - x.score AS change {heads} ORDER BY abs(y.score - x.score) DESC LIMIT ?", [top]).to_pylist()
    neurons = "FROM neurons x JOIN other.neurons y USING (layer, neuron)"
    stats = a.sql(f"SELECT count(*) AS n, avg(CASE WHEN x.promoted[1] = y.promoted[1] THEN 1.0 ELSE 0.0 END) "
                  f"AS same {neurons}").to_pylist()[0]
    report.neurons_compared = int(stats["n"])
    report.top_token_unchanged = stats["same"]
    report.most_changed_neurons = a.sql(
        f"SELECT 'L' || layer || '.N' || neuron AS neuron, x.promoted[1:5] AS top_a, y.promoted[1:5] AS top_b, "
        f"len(list_intersect(x.promoted, y.promoted)) / len(x.promoted) AS overlap {neurons} "
        "ORDER BY overlap, layer, neuron LIMIT ?", [top]).to_pylist()
    report.importance_changes = a.sql(
        "SELECT 'L' || layer || '.H' || head AS head, x.delta_loss AS importance_a, y.delta_loss AS importance_b "
        "FROM head_importance x JOIN other.head_importance y USING (layer, head) "
        "ORDER BY abs(y.delta_loss - x.delta_loss) DESC LIMIT ?", [top]).to_pylist()
    return report
