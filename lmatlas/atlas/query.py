"""Atlas: read an atlas file from Python, the CLI or the web explorer.

>>> atlas = Atlas.open("smollm2.atlas.duckdb")               # doctest: +SKIP
>>> atlas.heads(type="induction")                           # pyarrow.Table
>>> atlas.neurons(promotes=" dog").to_pandas()              # needs pandas
>>> atlas.search("Paris")                                   # heads and neurons writing that token
>>> atlas.sql("SELECT count(*) FROM neurons")               # anything else

Every query returns a ``pyarrow.Table`` (``.to_pandas()``, ``polars.from_arrow``);
in a notebook the atlas shows itself as an HTML summary.

An open atlas is a **sandbox**: the file is opened read-only, and DuckDB's access to
anything else (other files, ``COPY ... TO``, ``read_csv``, ``ATTACH``, installing or
loading extensions, the network) is disabled and locked, so SQL from a user or a web
request can only read the atlas's own tables. Every failure is an
:class:`~lmatlas.errors.AtlasError`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pyarrow as pa

from lmatlas.atlas.store import AtlasStore, damaged, is_damage
from lmatlas.errors import AtlasError


def _token_variants(text: str) -> list[str]:
    """The token strings a search for ``text`` matches: as given, and with/without one leading space."""
    bare = text.lstrip(" ")
    return sorted({text, bare, " " + bare})


class Atlas:
    """A read-only view of one atlas file."""

    def __init__(self, store: AtlasStore):
        self.store = store
        self.path = store.path

    @classmethod
    def open(cls, path: str | Path) -> "Atlas":
        return cls(AtlasStore.open_existing(path, read_only=True))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Atlas":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- basics ------------------------------------------------------------------------------------
    def sql(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run read-only SQL on the atlas's tables and views; the result as a ``pyarrow.Table``.

        The connection is sandboxed (module docstring): writes, other files, extensions and
        the network are refused.

        Raises:
            AtlasError: the SQL is invalid or not allowed, or the file is damaged.
        """
        import duckdb

        try:
            result = self.store.con.sql(query, params=params or None)
            if result is None:  # a statement with no result (SET, PRAGMA ...)
                return pa.table({})
            return result.to_arrow_table()
        except duckdb.Error as err:
            if is_damage(err):
                raise damaged(self.path, err) from None
            first = str(err).splitlines()[0]
            if isinstance(err, duckdb.PermissionException) or "disabled by configuration" in str(err):
                raise AtlasError(
                    f"Not allowed on an atlas: {first}. Atlas.sql only reads the atlas's own "
                    "tables (no other files, COPY, extensions or network)."
                ) from None
            if "read-only mode" in str(err):
                raise AtlasError(
                    f"Atlases are read-only here: {first}. Build or extend one with `lmatlas map` / build_atlas()."
                ) from None
            raise AtlasError(f"SQL error on {self.path}: {first}") from None

    @property
    def meta(self) -> dict[str, Any]:
        return self.store.meta()

    @property
    def card(self) -> dict[str, Any]:
        return self.meta.get("model", {})

    def stages(self) -> pa.Table:
        """Per stage: units done, total seconds, last finished."""
        return self.sql(
            "SELECT stage, count(*) AS units, sum(seconds) AS seconds, max(finished) AS finished "
            "FROM runs WHERE status = 'done' GROUP BY stage ORDER BY stage"
        )

    def missing_units(self) -> list[str]:
        """Units a build planned but did not finish (empty when the atlas is complete), in plan order."""
        planned = self.meta.get("planned_units") or []
        done = set(self.sql("SELECT unit FROM runs WHERE status = 'done'").column("unit").to_pylist())
        return [unit for unit in planned if unit not in done]

    def count(self, table: str) -> int:
        return int(self.sql(f"SELECT count(*) AS n FROM {table}").column("n")[0].as_py())

    # -- heads ---------------------------------------------------------------------------------------
    def head_types(self) -> pa.Table:
        """Per detector: how many heads carry its label."""
        return self.sql(
            "SELECT detector AS type, count(*) FILTER (WHERE label) AS heads, count(*) AS scored "
            "FROM head_scores GROUP BY detector ORDER BY detector"
        )

    def heads(self, type: str | None = None, layer: int | None = None) -> pa.Table:
        """Heads with their labels, importance and copying score; with ``type``, only that type's
        labelled heads with score, null baseline and z-score (strongest first)."""
        where, params = [], []
        if layer is not None:
            where.append("h.layer = ?")
            params.append(layer)
        if type is not None:
            where.append("s.detector = ? AND s.label")
            params.append(type)
            clause = " AND ".join(where)
            return self.sql(
                "SELECT s.layer, s.head, h.kv_group, s.detector AS type, s.score, s.baseline, s.z, s.seed "
                "FROM head_scores s JOIN heads h USING (layer, head) "
                f"WHERE {clause} ORDER BY s.score DESC",
                params,
            )
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self.sql(
            "SELECT h.layer, h.head, h.kv_group, "
            "list(s.detector ORDER BY s.detector) FILTER (WHERE s.label) AS labels, "
            "any_value(i.delta_loss) AS importance, any_value(o.copying) AS copying, "
            "any_value(o.suppression) AS suppression "
            "FROM heads h LEFT JOIN head_scores s USING (layer, head) LEFT JOIN head_importance i USING (layer, head) "
            f"LEFT JOIN head_ov o USING (layer, head) {clause} GROUP BY h.layer, h.head, h.kv_group "
            "ORDER BY h.layer, h.head",
            params,
        )

    # -- neurons ----------------------------------------------------------------------------------------
    def neurons(self, promotes: str | None = None, layer: int | None = None, limit: int = 50) -> pa.Table:
        """Neurons, optionally those promoting ``promotes`` (ranked by its rank in their top tokens, then logit)."""
        where, params = [], []
        if layer is not None:
            where.append("layer = ?")
            params.append(layer)
        rank = "NULL"
        if promotes is not None:
            variants = _token_variants(promotes)
            rank = "list_min([list_position(promoted, v) for v in ?])"
            where.append(f"{rank} IS NOT NULL")
            params = [variants] + params + [variants]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self.sql(
            f"SELECT layer, neuron, {rank} AS rank, promoted[1:5] AS promoted, promoted_logits[1] AS top_logit, "
            f"suppressed[1:5] AS suppressed, exciting[1:5] AS exciting FROM neurons {clause} "
            f"ORDER BY rank NULLS LAST, top_logit DESC LIMIT {int(limit)}",
            params,
        )

    def search(self, token: str | int, limit: int = 20, *, exact: bool = False) -> pa.Table:
        """Heads and neurons that write ``token``, on one scale: the logit they add to it, largest first.

        ``token`` is a token string (matched as given and with/without one leading space,
        or with ``exact=True`` only as given; byte tokens are spelled ``<0xE2>``) or a token
        id. The rows come from the stage
        ``search`` (``token_writers``): for every token the strongest neurons and heads by
        the logit they add through the final norm as the model applies it
        (:mod:`lmatlas.decode.search`), the same rows as ``lmatlas search MODEL``
        (:func:`lmatlas.atlas.token_search.search_model`). The atlas keeps
        :data:`~lmatlas.decode.search.DEPTH` of each kind per token: a larger ``limit`` gets those.

        With the stage ``features``, the dictionary features whose decoded tokens include the
        token follow (``kind="feature"``, ``L15.resid.post.F123``), ranked among themselves
        (:func:`lmatlas.atlas.token_search.feature_hits`: their logit is on another scale).

        Returns:
            ``kind, name, layer, index, logit, source, top_tokens``: ``source`` is a
            head's best source token, ``top_tokens`` a neuron's (or feature's) own top promoted tokens.

        Raises:
            AtlasError: the atlas lacks the stage ``search`` (the message has the command that adds it).
        """
        from lmatlas.atlas.ranking import as_table
        from lmatlas.atlas.token_search import feature_hits

        features = self._stage_done("features")
        variants = [] if isinstance(token, int) else ([token] if exact else _token_variants(token))
        if features and not self._search_done():
            ids = [int(token)] if isinstance(token, int) else []
            return as_table(feature_hits(self.sql, ids, variants, limit))
        self._require_search()
        if isinstance(token, int):
            ids = [int(token)]
        else:
            ids = (
                self.sql("SELECT token_id FROM vocab WHERE list_contains(?, token)", [variants])
                .column("token_id")
                .to_pylist()
            )
        hits = self._writer_hits(ids, limit)
        return as_table(hits + (feature_hits(self.sql, ids, variants, limit) if features else []))

    def _writer_hits(self, ids: list[int], limit: int) -> list[dict]:
        """The heads and neurons of ``token_writers`` that write the tokens ``ids``, ranked (:meth:`search`)."""
        from lmatlas.atlas.ranking import ranked
        from lmatlas.atlas.token_search import writer_hits

        rows = (
            self.sql("SELECT * FROM token_writers WHERE list_contains(?, token_id)", [ids]).to_pylist() if ids else []
        )
        sources = sorted({s for row in rows for s in row["head_sources"] or []})
        texts = {}
        if sources:
            found = self.sql("SELECT token_id, token FROM vocab WHERE list_contains(?, token_id)", [sources])
            texts = dict(zip(found.column("token_id").to_pylist(), found.column("token").to_pylist()))
        hits = ranked([h for row in rows for h in writer_hits(row, texts.get)], limit)
        neurons = [(h["layer"], h["index"]) for h in hits if h["kind"] == "neuron"]
        if neurons and self._has("neurons"):
            found = self.sql(
                "SELECT layer, neuron, promoted[1:5] AS top FROM neurons WHERE list_contains(?, [layer, neuron])",
                [[list(n) for n in neurons]],
            ).to_pylist()
            tops = {(r["layer"], r["neuron"]): r["top"] for r in found}
            for h in hits:
                if h["kind"] == "neuron":
                    h["top_tokens"] = tops.get((h["layer"], h["index"]))
        return hits

    def search_labels(self, text: str, limit: int = 20, *, labelled_only: bool = True) -> pa.Table:
        """Units whose label (stage ``labels``) mentions ``text`` in its sentence or rule, best score first.

        ``atlas.search_labels("induction")``, ``atlas.search_labels(" dog")``: columns ``unit,
        kind, layer, index, side, labelled, sentence, score`` (empty without the stage).
        """
        from lmatlas.atlas.label_view import find_labels

        return pa.Table.from_pylist(find_labels(self, text, limit, labelled_only))

    def explain(self, unit: str) -> dict[str, Any]:
        """A head's or neuron's label (``"L5.H3"``, ``"L12.N1031"``): sentence, scores, nulls (``lmatlas explain``)."""
        from lmatlas.atlas.label_view import explain

        return explain(self, unit)

    def search_depth(self) -> int:
        """How many neurons (and heads) the stage ``search`` kept per token (an error without the stage)."""
        self._require_search()
        return int(
            self.sql("SELECT len(neuron_indices) AS n FROM token_writers ORDER BY token_id LIMIT 1")
            .column("n")[0]
            .as_py()
        )

    def _has(self, table: str) -> bool:
        return bool(
            self.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [table])
            .column("n")[0]
            .as_py()
        )

    def _stage_done(self, stage: str) -> bool:
        """Whether any unit of ``stage`` is in the file."""
        query = "SELECT count(*) AS n FROM runs WHERE stage = ? AND status = 'done'"
        return bool(self.sql(query, [stage]).column("n")[0].as_py())

    def _search_done(self) -> bool:
        return self._has("token_writers") and self._stage_done("search")

    def _require_search(self) -> None:
        """Refuse a search on an atlas without its ``search`` stage, naming the command that adds it."""
        if not self._search_done():
            raise AtlasError(
                f"{self.path} cannot answer a token search: it lacks the stage 'search' (an older "
                f"atlas, or one built with --only). Add it with: {self.map_command(['search'])}"
            )

    def map_command(self, stages: list[str]) -> str:
        """The ``lmatlas map`` command that adds ``stages`` to this atlas (resuming it in place)."""
        import shlex

        from lmatlas.model.loading import PACKAGED_DEFAULT_LABEL

        source = self.card.get("source")
        parts = ["lmatlas", "map"] + ([] if source in (None, PACKAGED_DEFAULT_LABEL) else [str(source)])
        parts += ["--out", str(self.path), "--only", ",".join(stages)]
        return " ".join(shlex.quote(p) for p in parts)

    def layers(self) -> pa.Table:
        return self.sql("SELECT * FROM layers ORDER BY layer")

    # -- summaries ----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """A short JSON-ready summary: the model, what was built, head types, top neurons."""
        meta = self.meta
        card = meta.get("model", {})
        missing = self.missing_units()
        return {
            "path": str(self.path),
            "model": card.get("source"),
            "family": card.get("family"),
            "complete": not missing,
            "missing_units": missing,
            "resume_command": meta.get("resume_command"),
            "stages": self.stages().to_pylist(),
            "head_types": self.head_types().to_pylist(),
            "heads": self.count("heads"),
            "neurons_decoded": self.count("neurons"),
            "neurons_with_stats": self.count("neuron_stats"),
            "most_important_heads": self.sql(
                "SELECT 'L' || layer || '.H' || head AS head, delta_loss FROM head_importance "
                "ORDER BY delta_loss DESC LIMIT 5"
            ).to_pylist(),
        }

    def _repr_html_(self) -> str:
        summary = self.summary()
        rows = "".join(
            f"<tr><td>{html.escape(str(r['type']))}</td><td>{r['heads']}</td><td>{r['scored']}</td></tr>"
            for r in summary["head_types"]
        )
        return (
            f"<b>lmatlas atlas</b> of {html.escape(str(summary['model']))} ({html.escape(str(summary['family']))})"
            f" — {html.escape(summary['path'])}<br>{summary['heads']} heads, {summary['neurons_decoded']} neurons "
            f"decoded<table><tr><th>head type</th><th>heads</th><th>scored</th></tr>{rows}</table>"
        )

    def __repr__(self) -> str:
        return f"Atlas({str(self.path)!r}, model={self.card.get('source')!r})"
