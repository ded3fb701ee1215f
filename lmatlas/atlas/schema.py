"""The atlas schema: one DuckDB file per model.

Tables (long format, keyed by layer/head/neuron, so that new detectors and stages
add rows, not columns):

=================  ===========================================================================
table              one row per
=================  ===========================================================================
meta               key -> JSON value: model card, provenance, schema version, corpus
runs               work unit: stage, key, status, seconds, seeds, versions, when
heads              (layer, head): KV group
head_scores        (layer, head, detector): score, null baseline, z-score, label, seed
head_ov            (layer, head): copying and suppression scores, top source→output pairs
head_importance    (layer, head): loss increase when the head is mean-ablated on the corpus (exact or estimated: method)
neurons            (layer, neuron): promoted / suppressed / exciting tokens with logits
neuron_stats       (layer, neuron): activation mean, max, fraction active, top contexts
layer_lens         layer: logit-lens statistics over the corpus
mlp_importance     layer: loss increase when the layer's MLP is mean-ablated on the corpus (exact or estimated: method)
effects            (task, method, target): metric after patching, effect, fraction of the gap, exact check
circuits           (task, method, source, target): edge score of a circuit, its faithfulness, how it was
                   run (granularity: edges, or nodes; NULL in older atlases = nodes), CPR, CMD and
                   the verification of its top edges by exact edge patching (Spearman, largest error)
corpus             corpus window: its token ids and token strings
head_windows       (layer, head, rank): a window where the head writes most, its attention there
neuron_contexts    (layer, neuron, rank): a top-activating position with per-token activation levels
neuron_histograms  (layer, neuron): histogram of the neuron's activations over the corpus
token_writers      token: the strongest neurons and heads writing it, on one scale (parallel lists)
vocab              token: its display string (what a search by text matches)
labels             (unit, side): a unit's label: rule (JSON), sentence, headline score with interval,
                   all scores, nulls, n, corpus hash, seed (see :mod:`lmatlas.labels`)
features           (site, feature): a dictionary latent (``L15.resid.post.F123``): decoded tokens, density
feature_contexts   (site, feature, rank): a top-activating corpus span with per-token activation levels
feature_links      (site, feature, relation, rank): a head (``L3.H1``: writes, reads_q, reads_k) or neuron
                   (``L2.N5``: aligns) linked to the feature, with ``unit_layer``/``unit_index`` to join on
labels             (unit, side): a unit's label: rule (JSON), sentence, headline score with interval,
                   all scores, nulls, n, corpus hash, seed (see :mod:`lmatlas.labels`)
=================  ===========================================================================

The view ``layers`` joins ``layer_lens`` and ``mlp_importance``.

**Tokens** are stored twice: as display strings (``promoted``, ``top_outputs``, ...;
byte tokens spelled ``<0xE2>``, see :mod:`lmatlas.decode.token_text`) and as token ids
in the ``*_ids`` column next to each (``promoted_ids``, ``top_output_ids``, ...), which
are the identity (``lmatlas diff`` compares ids). ``neuron_stats.top_context_ids``
holds each context's token ids, the activating token last. Columns are only ever
added (:data:`ADDED_COLUMNS`): readers of older files keep working, and an older
atlas gains the columns (empty for its old rows) when a build resumes it.

A unit's rows and its ``runs`` row are written in one transaction, so a unit is
either wholly in the file or not at all (see :mod:`lmatlas.atlas.store`).
"""

from __future__ import annotations

SCHEMA_VERSION = 2
ATLAS_KIND = "lmatlas-atlas"

TABLES: dict[str, str] = {
    "meta": "key VARCHAR PRIMARY KEY, value JSON",
    "runs": (
        "stage VARCHAR, unit VARCHAR PRIMARY KEY, status VARCHAR, seconds DOUBLE, finished TIMESTAMP, "
        "seeds JSON, versions JSON, params JSON"
    ),
    "heads": "layer INTEGER, head INTEGER, kv_group INTEGER, PRIMARY KEY (layer, head)",
    "head_scores": (
        "layer INTEGER, head INTEGER, detector VARCHAR, score DOUBLE, baseline DOUBLE, z DOUBLE, "
        "label BOOLEAN, seed INTEGER, PRIMARY KEY (layer, head, detector)"
    ),
    "head_ov": (
        "layer INTEGER, head INTEGER, copying DOUBLE, suppression DOUBLE, top_sources VARCHAR[], "
        "top_outputs VARCHAR[], top_logits DOUBLE[], top_source_ids INTEGER[], top_output_ids INTEGER[], "
        "PRIMARY KEY (layer, head)"
    ),
    "head_importance": "layer INTEGER, head INTEGER, delta_loss DOUBLE, PRIMARY KEY (layer, head)",
    "neurons": (
        "layer INTEGER, neuron INTEGER, promoted VARCHAR[], promoted_logits DOUBLE[], suppressed VARCHAR[], "
        "suppressed_logits DOUBLE[], exciting VARCHAR[], exciting_logits DOUBLE[], promoted_ids INTEGER[], "
        "suppressed_ids INTEGER[], exciting_ids INTEGER[], PRIMARY KEY (layer, neuron)"
    ),
    "neuron_stats": (
        "layer INTEGER, neuron INTEGER, mean DOUBLE, max DOUBLE, frac_active DOUBLE, top_contexts VARCHAR[], "
        "top_context_ids INTEGER[][], PRIMARY KEY (layer, neuron)"
    ),
    "layer_lens": (
        "layer INTEGER PRIMARY KEY, entropy DOUBLE, final_prob DOUBLE, kl_to_final DOUBLE, top1_agreement DOUBLE"
    ),
    "mlp_importance": "layer INTEGER PRIMARY KEY, delta_loss DOUBLE",
    "effects": (
        "task VARCHAR, method VARCHAR, metric VARCHAR, target VARCHAR, value DOUBLE, effect DOUBLE, "
        "normalized DOUBLE, exact DOUBLE, PRIMARY KEY (task, method, target)"
    ),
    "circuits": (
        "task VARCHAR, method VARCHAR, source VARCHAR, target VARCHAR, score DOUBLE, faithfulness DOUBLE, "
        "granularity VARCHAR, cpr DOUBLE, cmd DOUBLE, verified_spearman DOUBLE, verified_max_error DOUBLE, "
        "PRIMARY KEY (task, method, source, target)"
    ),
    "corpus": "window_id INTEGER PRIMARY KEY, ids INTEGER[], tokens VARCHAR[]",
    "head_windows": (
        "layer INTEGER, head INTEGER, rank INTEGER, window_id INTEGER, query_pos INTEGER, start INTEGER, "
        "write_norm DOUBLE, attention FLOAT[], PRIMARY KEY (layer, head, rank)"
    ),
    "neuron_contexts": (
        "layer INTEGER, neuron INTEGER, rank INTEGER, window_id INTEGER, pos INTEGER, start INTEGER, "
        "activation DOUBLE, levels TINYINT[], PRIMARY KEY (layer, neuron, rank)"
    ),
    "neuron_histograms": (
        "layer INTEGER, neuron INTEGER, lo DOUBLE, hi DOUBLE, scale DOUBLE, counts INTEGER[], "
        "PRIMARY KEY (layer, neuron)"
    ),
    "token_writers": (
        "token_id INTEGER PRIMARY KEY, neuron_layers SMALLINT[], neuron_indices INTEGER[], neuron_logits FLOAT[], "
        "head_layers SMALLINT[], head_indices SMALLINT[], head_logits FLOAT[], head_sources INTEGER[]"
    ),
    "vocab": "token_id INTEGER PRIMARY KEY, token VARCHAR",
    "features": (
        "site VARCHAR, feature INTEGER, name VARCHAR, layer INTEGER, kind VARCHAR, n_latents INTEGER, "
        "density DOUBLE, max DOUBLE, promoted VARCHAR[], promoted_logits DOUBLE[], promoted_ids INTEGER[], "
        "suppressed VARCHAR[], suppressed_logits DOUBLE[], suppressed_ids INTEGER[], PRIMARY KEY (site, feature)"
    ),
    "feature_contexts": (
        "site VARCHAR, feature INTEGER, rank INTEGER, window_id INTEGER, pos INTEGER, start INTEGER, "
        "activation DOUBLE, tokens VARCHAR[], levels TINYINT[], PRIMARY KEY (site, feature, rank)"
    ),
    "feature_links": (
        "site VARCHAR, feature INTEGER, relation VARCHAR, rank INTEGER, unit VARCHAR, unit_layer INTEGER, "
        "unit_index INTEGER, score DOUBLE, PRIMARY KEY (site, feature, relation, rank)"
    ),
    "labels": (
        "unit VARCHAR, kind VARCHAR, layer INTEGER, idx INTEGER, side VARCHAR, labelled BOOLEAN, rule JSON, "
        "sentence VARCHAR, score DOUBLE, score_lo DOUBLE, score_hi DOUBLE, scores JSON, nulls JSON, n INTEGER, "
        "corpus_hash VARCHAR, seed INTEGER, PRIMARY KEY (unit, side)"
    ),
}

VIEWS: dict[str, str] = {
    "layers": (
        "SELECT COALESCE(l.layer, m.layer) AS layer, l.entropy AS lens_entropy, l.final_prob AS lens_final_prob, "
        "l.kl_to_final AS lens_kl_to_final, l.top1_agreement AS lens_top1_agreement, m.delta_loss AS mlp_delta_loss "
        "FROM layer_lens l FULL OUTER JOIN mlp_importance m ON l.layer = m.layer"
    ),
}


#: Columns added after schema version 1 (also in :data:`TABLES`): ``table -> [(column, type), ...]``.
ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "head_ov": [("top_source_ids", "INTEGER[]"), ("top_output_ids", "INTEGER[]")],
    "neurons": [("promoted_ids", "INTEGER[]"), ("suppressed_ids", "INTEGER[]"), ("exciting_ids", "INTEGER[]")],
    "neuron_stats": [("top_context_ids", "INTEGER[][]")],
    "head_importance": [("estimate", "DOUBLE"), ("method", "VARCHAR")],
    "mlp_importance": [("estimate", "DOUBLE"), ("method", "VARCHAR")],
    "circuits": [
        ("granularity", "VARCHAR"),
        ("cpr", "DOUBLE"),
        ("cmd", "DOUBLE"),
        ("verified_spearman", "DOUBLE"),
        ("verified_max_error", "DOUBLE"),
    ],
}


def create_statements() -> list[str]:
    """``CREATE TABLE IF NOT EXISTS`` for every table, then the added columns an older file lacks."""
    tables = [f"CREATE TABLE IF NOT EXISTS {name} ({columns})" for name, columns in TABLES.items()]
    added = [
        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"
        for table, columns in ADDED_COLUMNS.items()
        for column, kind in columns
    ]
    return tables + added + [f"CREATE OR REPLACE VIEW {name} AS {query}" for name, query in VIEWS.items()]
