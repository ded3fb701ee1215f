"""The documentation's generated parts: every error class documented, every page generator runs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
from pathlib import Path

import pytest

import lmatlas
import lmatlas.errors as errors

ROOT = Path(__file__).resolve().parents[2]
HTTP_ERRORS = {"lmatlas.web.errors"}  # HTTP status carriers, documented by the API schema


def _all_error_classes() -> set[type]:
    for info in pkgutil.walk_packages(lmatlas.__path__, "lmatlas."):
        if not info.name.startswith("lmatlas.cli"):  # the CLI adds no error classes; importing it is slow
            importlib.import_module(info.name)
    found, todo = set(), [errors.LmatlasError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_lives_in_errors_py_with_its_help():
    for cls in _all_error_classes():
        if cls.__module__ in HTTP_ERRORS:
            continue
        assert cls.__module__ == "lmatlas.errors", f"{cls.__name__} is defined in {cls.__module__}"
        assert "help" in vars(cls), f"{cls.__name__} has no Help (symptom, cause, fix)"
        assert all(len(part) > 20 for part in cls.help), cls.__name__


@pytest.fixture(scope="module")
def hooks():
    """The MkDocs hooks module, loaded from its file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_name_every_command_error_and_record(hooks):
    from typer.main import get_command

    from lmatlas.cli import app

    cli = hooks.cli_page()
    group = get_command(app)
    assert all(f"## `lmatlas {name}`" in cli for name in group.commands)
    subcommands = [(name, sub) for name, c in group.commands.items() for sub in getattr(c, "commands", {})]
    assert subcommands and all(f"### `lmatlas {name} {sub}`" in cli for name, sub in subcommands)
    assert "`--strategy`" in cli and "`--prompt-file`" in cli
    page = hooks.errors_page()
    assert all(f"[{name}](errors/{name}.md)" in page for name in ("SiteError", "InputError", "DraftHeadsError"))
    from lmatlas.errors import SiteError

    one = hooks.error_page(SiteError)
    assert all(part in one for part in ("## Symptom", "## Cause", "## Fix", SiteError.help.fix))
    bench = hooks.benchmarks_page()
    assert all(f"## {path.stem}" in bench for path in (ROOT / "bench" / "results").glob("*.json"))
    stages = hooks.map_stages_table()
    record = json.loads((ROOT / "bench" / "results" / "map.json").read_text())
    assert all(f"| {stage} | {value:.1f} |" in stages for stage, value in record["seconds_by_stage"].items())
    assert f"Whole build {record['build_s']:.1f} s" in stages
    table = hooks.combinations_table()
    assert "speculative" in table and "refused" in table
