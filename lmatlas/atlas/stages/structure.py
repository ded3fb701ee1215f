"""Stage ``structure``: one row per head with its KV group (GQA layout)."""

from __future__ import annotations

from lmatlas.atlas.stages import Stage, stage

stage(
    Stage(
        name="structure",
        description="every head with its KV group",
        plan=lambda model, ctx: ["structure/all"],
        compute=lambda model, unit, ctx: {
            "heads": [
                {"layer": layer, "head": head, "kv_group": model.layout.kv_head(head)}
                for layer in range(model.layout.n_layers)
                for head in range(model.layout.n_heads)
            ]
        },
    )
)
