"""Diff two atlases of one architecture (base vs. instruct, two quantisations).

* per head and detector: the score change and label flips;
* neurons: the fraction whose top promoted token is unchanged (the neuron-decoding
  paper reports over 75% for Llama-3.1-8B base vs. instruct) and the neurons whose
  top-k promoted tokens changed most (lowest overlap), compared by token id;
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
    """Compare atlas ``b`` against atlas ``a``; identical atlases report no change at all.

    Tokens are compared by id where both atlases store ids (every atlas built since
    schema version 2), by display string otherwise. The lists hold only what changed:
    ``most_changed_neurons`` neurons whose top-k overlap is below 1, ``most_changed_heads``
    and ``importance_changes`` non-zero changes.
    """
    import duckdb

    with Atlas.open(path_a) as a, Atlas.open(path_b) as b:
        _check_comparable(a, b)
        con = duckdb.connect(":memory:", config={"enable_external_access": False})
        try:
            for name, atlas in (("x", a), ("y", b)):
                for table in ("head_scores", "neurons", "head_importance"):
                    con.register(f"{name}_{table}", atlas.sql(f"SELECT * FROM {table}"))
            return _diff(con, Path(path_a), Path(path_b), top)
        except duckdb.Error as err:
            raise AtlasError(f"Cannot diff {path_a} and {path_b}: {str(err).splitlines()[0]}") from None
        finally:
            con.close()


def _rows(con, query: str, params: list | None = None) -> list[dict[str, Any]]:
    return con.sql(query, params=params).to_arrow_table().to_pylist()


def _has_ids(con) -> bool:
    """True when both atlases store neuron token ids for every neuron."""
    for name in ("x", "y"):
        columns = {row[0] for row in con.sql(f"DESCRIBE {name}_neurons").fetchall()}
        if "promoted_ids" not in columns:
            return False
        if con.sql(f"SELECT count(*) FROM {name}_neurons WHERE promoted_ids IS NULL").fetchall()[0][0]:
            return False
    return True


def _diff(con, path_a: Path, path_b: Path, top: int) -> AtlasDiff:
    report = AtlasDiff(str(path_a), str(path_b))
    heads = "FROM x_head_scores x JOIN y_head_scores y USING (layer, head, detector)"
    report.heads_compared = int(con.sql(f"SELECT count(DISTINCT (layer, head)) {heads}").fetchall()[0][0])
    report.label_flips = _rows(
        con,
        f"SELECT 'L' || layer || '.H' || head AS head, detector, x.label AS label_a, y.label AS label_b, "
        f"x.score AS score_a, y.score AS score_b {heads} WHERE x.label IS DISTINCT FROM y.label "
        "ORDER BY abs(y.score - x.score) DESC, layer, head",
    )
    report.most_changed_heads = _rows(
        con,
        f"SELECT 'L' || layer || '.H' || head AS head, detector, x.score AS score_a, y.score AS score_b, "
        f"y.score - x.score AS change {heads} WHERE x.score IS DISTINCT FROM y.score "
        "ORDER BY abs(y.score - x.score) DESC, layer, head LIMIT ?",
        [top],
    )
    key = "promoted_ids" if _has_ids(con) else "promoted"
    neurons = "FROM x_neurons x JOIN y_neurons y USING (layer, neuron)"
    n, same = con.sql(
        f"SELECT count(*), avg(CASE WHEN x.{key}[1] = y.{key}[1] THEN 1.0 ELSE 0.0 END) {neurons}"
    ).fetchall()[0]
    report.neurons_compared = int(n)
    report.top_token_unchanged = same
    # overlap of the top-k as sets of distinct tokens (ids are distinct; strings may repeat)
    overlap = f"len(list_intersect(x.{key}, y.{key})) / greatest(len(list_distinct(x.{key})), 1)"
    report.most_changed_neurons = _rows(
        con,
        f"SELECT * FROM (SELECT 'L' || layer || '.N' || neuron AS neuron, layer, neuron AS index, "
        f"x.promoted[1:5] AS top_a, y.promoted[1:5] AS top_b, {overlap} AS overlap {neurons}) "
        "WHERE overlap < 1 ORDER BY overlap, layer, index LIMIT ?",
        [top],
    )
    for row in report.most_changed_neurons:
        del row["layer"], row["index"]
    report.importance_changes = _rows(
        con,
        "SELECT 'L' || layer || '.H' || head AS head, x.delta_loss AS importance_a, y.delta_loss AS importance_b "
        "FROM x_head_importance x JOIN y_head_importance y USING (layer, head) "
        "WHERE x.delta_loss IS DISTINCT FROM y.delta_loss "
        "ORDER BY abs(y.delta_loss - x.delta_loss) DESC, layer, head LIMIT ?",
        [top],
    )
    return report
