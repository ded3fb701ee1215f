"""Atlas parameters: one frozen dataclass, unknown names refused, old atlases' settings still resume."""

from __future__ import annotations

import dataclasses

import pytest
from support.models import get_tiny

from lmatlas.atlas import build_atlas
from lmatlas.atlas.params import AtlasParams
from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.store import AtlasStore
from lmatlas.errors import AtlasError, AtlasParamsError

SMALL = {"corpus_sequences": 2, "seq_len": 16}


def test_defaults_frozen_and_documented():
    params = AtlasParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.top_k = 3  # type: ignore[misc]
    doc = AtlasParams.__doc__ or ""
    assert all(f"{f.name}:" in doc for f in dataclasses.fields(AtlasParams))  # every field documented
    assert AtlasParams.from_dict({"top_k": 3}) == dataclasses.replace(params, top_k=3)


def test_unknown_name_and_wrong_type_are_refused():
    with pytest.raises(AtlasParamsError, match="Unknown atlas parameter.*top_kk.*Known:.*top_k"):
        AtlasParams.from_dict({"top_kk": 3})
    with pytest.raises(AtlasParamsError, match="must be int"):
        AtlasParams.from_dict({"top_k": "3"})
    with pytest.raises(AtlasParamsError):
        build_atlas(get_tiny("llama"), "/nonexistent/never-written.duckdb", params={"seq_lenn": 8}, progress=False)


def test_context_reads_the_dataclass():
    ctx = make_context(get_tiny("llama"), params={**SMALL, "top_contexts": 2})
    assert isinstance(ctx.params, AtlasParams)
    assert ctx.corpus.shape == (2, 16) and ctx.params.top_contexts == 2 and ctx.params.corpus == "stdlib-docstrings"


def test_an_atlas_stored_with_fewer_names_resumes(tmp_path):
    """An atlas whose stored settings predate some names (their defaults) resumes; another value is refused."""
    model, path = get_tiny("llama"), tmp_path / "a.duckdb"
    build_atlas(model, path, only=["structure"], params=SMALL, progress=False)
    store = AtlasStore.create_or_open(path, model.card())
    old = {k: v for k, v in store.meta()["params"].items() if k not in ("ov_sources", "label_steer")}
    store.put_meta({"params": old})
    store.close()
    report = build_atlas(model, path, only=["structure"], params=SMALL, progress=False)
    assert report.skipped == report.planned
    with pytest.raises(AtlasError, match="other settings"):
        build_atlas(model, path, only=["structure"], params={**SMALL, "ov_sources": 64}, progress=False)
