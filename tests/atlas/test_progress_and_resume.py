"""Long work says what it is doing and how to resume: progress of exact patching, an interrupted map."""

from __future__ import annotations

from typer.testing import CliRunner

from lmatlas.cli import app


def test_an_interrupted_map_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C during `lmatlas map`: one line with the resume command, exit status 130."""
    import lmatlas.atlas.pipeline as atlas_pkg
    from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlas_pkg, "build_atlas", interrupted)
    out = tmp_path / "x.atlas.duckdb"
    result = CliRunner().invoke(app, ["map", str(tmp_path / "m"), "--out", str(out), "--only", "structure"])
    assert result.exit_code == 130, result.output
    assert f"resume with `lmatlas map {tmp_path / 'm'} --out {out} --only structure`" in " ".join(result.stderr.split())


def test_patch_reports_progress(monkeypatch):
    from lmatlas.causal import load_task, patch
    from lmatlas.model.tiny import tiny_model

    model = tiny_model("llama")
    task = load_task(model, "induction", n=2)
    seen = []
    patch(model, task, ["L0.H0", "L0.H1", "L1.H0"], progress=lambda done, total, what: seen.append((done, total)))
    assert seen and seen[-1] == (3, 3)
